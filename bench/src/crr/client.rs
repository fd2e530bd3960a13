//! The client: threads running CRR or RR transactions back to back, pinned
//! or not, in their turns' slices, merged into one report.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::config::{monotonic_ns, ClientConfig, Mode, Phase, Report, Schedule, LATE_START};
use super::histogram::Histogram;

struct ThreadResult {
    hist: Histogram,
    connect_errors: u64,
    io_errors: u64,
}

fn connect(target: SocketAddr, timeout: Option<Duration>) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(t) = timeout {
        // SO_SNDTIMEO also bounds a blocking connect() on Linux.
        socket.set_write_timeout(Some(t))?;
        socket.set_read_timeout(Some(t))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

/// A UDP socket for `target`'s family, connected to it when `connected`.
fn udp_socket(
    target: SocketAddr,
    timeout: Option<Duration>,
    connected: bool,
) -> io::Result<UdpSocket> {
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(timeout)?;
    if connected {
        socket.connect(target)?;
    }
    Ok(socket)
}

/// One UDP request and its answer; a lost datagram is a timeout error.
fn udp_exchange(
    socket: &UdpSocket,
    target: SocketAddr,
    connected: bool,
    request: &[u8],
    response: &mut [u8],
) -> io::Result<()> {
    if connected {
        socket.send(request)?;
        socket.recv(response)?;
    } else {
        socket.send_to(request, target)?;
        socket.recv_from(response)?;
    }
    Ok(())
}

fn exchange(stream: &mut TcpStream, request: &[u8], response: &mut [u8]) -> io::Result<()> {
    stream.write_all(request)?;
    stream.read_exact(response)
}

/// The CPUs this process may run on.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads `set` within CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: as in `allowed_cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` comes from `allowed_cpus`, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn client_thread(cfg: &ClientConfig, start: &Barrier) -> ThreadResult {
    let request = vec![b'q'; cfg.size];
    let mut response = vec![0u8; cfg.size];
    let mut hist = Histogram::new();
    let mut connect_errors = 0u64;
    let mut io_errors = 0u64;
    let mut rr_conn: Option<TcpStream> = None;
    let mut udp: Option<UdpSocket> = None;

    start.wait();
    let schedule = Schedule::new(cfg.duration, monotonic_ns(), cfg.turns);
    let mut last = monotonic_ns();
    loop {
        match schedule.phase(last) {
            Phase::Done => break,
            Phase::Waiting { until_ns } => {
                thread::sleep(Duration::from_nanos(until_ns.saturating_sub(last)));
                // The wait is not part of the next transaction.
                last = monotonic_ns();
                continue;
            }
            Phase::Running { .. } => {}
        }
        let ok = match cfg.mode {
            Mode::Crr => match connect(cfg.target, cfg.timeout) {
                Ok(mut stream) => {
                    // Dropping the stream closes it: the client closes first.
                    let r = exchange(&mut stream, &request, &mut response);
                    if r.is_err() {
                        io_errors += 1;
                    }
                    r.is_ok()
                }
                Err(_) => {
                    connect_errors += 1;
                    false
                }
            },
            Mode::Rr => {
                if rr_conn.is_none() {
                    match connect(cfg.target, cfg.timeout) {
                        Ok(s) => rr_conn = Some(s),
                        Err(_) => connect_errors += 1,
                    }
                    // Connection setup is not part of an RR transaction.
                    last = monotonic_ns();
                }
                match rr_conn.as_mut() {
                    Some(stream) => {
                        let r = exchange(stream, &request, &mut response);
                        if r.is_err() {
                            io_errors += 1;
                            rr_conn = None;
                        }
                        r.is_ok()
                    }
                    None => false,
                }
            }
            Mode::Udp | Mode::UdpConnected => {
                let connected = cfg.mode == Mode::UdpConnected;
                if udp.is_none() {
                    match udp_socket(cfg.target, cfg.timeout, connected) {
                        Ok(s) => udp = Some(s),
                        Err(_) => connect_errors += 1,
                    }
                    last = monotonic_ns();
                }
                match udp.as_ref() {
                    Some(socket) => {
                        let r =
                            udp_exchange(socket, cfg.target, connected, &request, &mut response);
                        if r.is_err() {
                            io_errors += 1;
                        }
                        r.is_ok()
                    }
                    None => false,
                }
            }
        };
        let now = monotonic_ns();
        if ok {
            hist.record(now.saturating_sub(last));
        }
        last = now;
    }
    ThreadResult {
        hist,
        connect_errors,
        io_errors,
    }
}

/// Runs the client for `cfg.duration` over `cfg.threads` threads and returns
/// the merged report.
pub fn run_client(cfg: &ClientConfig) -> io::Result<Report> {
    if cfg.threads == 0 {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "threads must be at least 1",
        ));
    }
    if cfg.size == 0 {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "size must be at least 1 byte",
        ));
    }
    // The epoch of a run without turns does not matter here: only its
    // running time and a turn's first slice are read.
    let schedule = Schedule::new(cfg.duration, 0, cfg.turns);
    if cfg.turns.is_some() {
        let first_slice_ns = schedule.slice_start(0);
        let now_ns = monotonic_ns();
        if now_ns > first_slice_ns {
            return Err(io::Error::other(format!(
                "{LATE_START} by {:.1} ms",
                (now_ns - first_slice_ns) as f64 / 1e6
            )));
        }
    }
    let cpus = if cfg.pin { allowed_cpus()? } else { Vec::new() };
    let barrier = Arc::new(Barrier::new(cfg.threads + 1));
    let mut handles = Vec::with_capacity(cfg.threads);
    for i in 0..cfg.threads {
        let cfg = cfg.clone();
        let barrier = Arc::clone(&barrier);
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let h = thread::Builder::new()
            .name(format!("crr-client-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    // Unpinned is still a valid (noisier) measurement.
                    let _ = pin_current_thread(cpu);
                }
                client_thread(&cfg, &barrier)
            })?;
        handles.push(h);
    }
    barrier.wait();

    let mut hist = Histogram::new();
    let mut connect_errors = 0;
    let mut io_errors = 0;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| io::Error::other("client thread panicked"))?;
        hist.merge(&r.hist);
        connect_errors += r.connect_errors;
        io_errors += r.io_errors;
    }
    // Transactions start only within the schedule's slices (the last one of
    // a slice may end a little past it).
    let elapsed = schedule.running_time().as_secs_f64();
    let us = |ns: u64| ns as f64 / 1000.0;
    let transactions = hist.len();
    Ok(Report {
        mode: cfg.mode,
        target: cfg.target.to_string(),
        threads: cfg.threads,
        size: cfg.size,
        duration_s: elapsed,
        transactions,
        tps: if elapsed > 0.0 {
            transactions as f64 / elapsed
        } else {
            0.0
        },
        p50_us: us(hist.quantile(0.50)),
        p90_us: us(hist.quantile(0.90)),
        p99_us: us(hist.quantile(0.99)),
        mean_us: hist.mean() / 1000.0,
        min_us: us(hist.min()),
        max_us: us(hist.max()),
        errors: connect_errors + io_errors,
        connect_errors,
        io_errors,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::crr::{Server, ServerConfig, Turns};

    #[test]
    fn taking_turns_on_loopback_runs_only_in_own_slices() {
        let server = loopback_server(1);
        let slice = Duration::from_millis(50);
        let epoch_ns = monotonic_ns() + 20_000_000;
        let report = run_client(&ClientConfig {
            turns: Some(Turns {
                epoch_ns,
                slice,
                turn: 1,
                of: 2,
            }),
            ..ClientConfig::new(server.local_addr(), 1, Duration::from_millis(150))
        })
        .expect("client runs");
        assert!(report.transactions > 0, "{report}");
        assert_eq!(report.duration_s, 0.15);
        // Three slices of its own, each after one of the other client's:
        // the run ends with its last slice, six slices after the epoch.
        let ended = monotonic_ns();
        assert!(ended >= epoch_ns + 6 * 50_000_000, "ended too early");
        server.shutdown();
    }

    fn loopback_server(size: usize) -> Server {
        let cfg = ServerConfig {
            size,
            ..ServerConfig::default()
        };
        Server::bind("127.0.0.1:0".parse().unwrap(), cfg).expect("bind loopback")
    }

    fn run(server: &Server, mode: Mode, size: usize, threads: usize, secs: f64) -> Report {
        let cfg = ClientConfig {
            size,
            mode,
            ..ClientConfig::new(server.local_addr(), threads, Duration::from_secs_f64(secs))
        };
        run_client(&cfg).expect("client runs")
    }

    #[test]
    fn pinned_threads_run_on_allowed_cpus() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let server = loopback_server(1);
        let cfg = ClientConfig {
            pin: true,
            ..ClientConfig::new(server.local_addr(), 3, Duration::from_millis(200))
        };
        let report = run_client(&cfg).expect("client runs");
        assert!(report.transactions > 0, "{report}");
        let first = cpus[0];
        std::thread::spawn(move || {
            pin_current_thread(first).unwrap();
            assert_eq!(allowed_cpus().unwrap(), [first]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn crr_on_loopback() {
        let server = loopback_server(1);
        let report = run(&server, Mode::Crr, 1, 2, 1.0);
        eprintln!("{report}");
        assert!(report.transactions > 0, "{report}");
        assert_eq!(report.errors, 0, "{report}");
        assert!(
            report.p50_us > 0.0 && report.p99_us >= report.p50_us,
            "{report}"
        );
        assert!(server.stats().accepted.load(Ordering::Relaxed) >= report.transactions);
        // The JSON line parses back and carries the fields a driver reads.
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["mode"], "crr");
        assert_eq!(v["transactions"].as_u64(), Some(report.transactions));
        assert_eq!(v["errors"].as_u64(), Some(0));
        assert!(v["p99_us"].is_number() && v["tps"].is_number());
        server.shutdown();
    }

    #[test]
    fn rr_on_loopback() {
        let server = loopback_server(1);
        let report = run(&server, Mode::Rr, 1, 2, 0.5);
        eprintln!("{report}");
        assert!(report.transactions > 0, "{report}");
        assert_eq!(report.errors, 0, "{report}");
        // One connection per client thread, kept open.
        assert_eq!(server.stats().accepted.load(Ordering::Relaxed), 2);
        assert_eq!(server.stats().kept_open.load(Ordering::Relaxed), 2);
        server.shutdown();
    }

    #[test]
    fn udp_on_loopback_unconnected_and_connected() {
        let server = loopback_server(4);
        for mode in [Mode::Udp, Mode::UdpConnected] {
            let before = server.stats().transactions.load(Ordering::Relaxed);
            let report = run(&server, mode, 4, 2, 0.3);
            assert!(report.transactions > 0, "{report}");
            assert_eq!(report.errors, 0, "{report}");
            // The server counts an answer after sending it: each of the
            // two client threads may have had its last one counted late.
            let served = server.stats().transactions.load(Ordering::Relaxed) - before;
            assert!(served + 2 >= report.transactions, "{served} {report}");
        }
        assert_eq!(server.stats().accepted.load(Ordering::Relaxed), 0);
        server.shutdown();
    }

    #[test]
    fn larger_messages_on_loopback() {
        let size = 64 * 1024;
        let server = loopback_server(size);
        for mode in [Mode::Crr, Mode::Rr] {
            let report = run(&server, mode, size, 2, 0.3);
            assert!(report.transactions > 0, "{report}");
            assert_eq!(report.errors, 0, "{report}");
        }
        server.shutdown();
    }

    #[test]
    fn refused_connections_count_as_errors() {
        // Bind then drop a listener so the port is (very likely) closed.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let cfg = ClientConfig::new(addr, 1, Duration::from_millis(50));
        let report = run_client(&cfg).unwrap();
        assert_eq!(report.transactions, 0);
        assert!(report.connect_errors > 0);
        assert_eq!(report.errors, report.connect_errors + report.io_errors);
    }

    #[test]
    fn rejects_bad_config() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut cfg = ClientConfig::new(addr, 0, Duration::from_millis(1));
        assert!(run_client(&cfg).is_err());
        cfg.threads = 1;
        cfg.size = 0;
        assert!(run_client(&cfg).is_err());
    }
}
