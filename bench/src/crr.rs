//! TCP_CRR / TCP_RR load generator and its server.
//!
//! * **CRR** (connect, request, response, close): every transaction opens a
//!   new TCP connection, writes `size` bytes, reads `size` bytes back and
//!   closes. Every transaction therefore pays the service lookup (socket-level
//!   translation, iptables/nftables DNAT, ...), which is what the datapath
//!   benchmark is about.
//! * **RR** (request, response): one connection per client thread is kept open
//!   and carries back-to-back transactions.
//!
//! The server answers each `size`-byte request with `size` bytes and then
//! waits for the client to close first, so that TIME_WAIT lands on the client
//! and not on the server (a server-side TIME_WAIT pile-up skews results).
//!
//! The client sets nothing special on its sockets beyond `TCP_NODELAY` and the
//! optional send/receive timeouts; it closes normally. Because every CRR
//! transaction burns a client port that then sits in TIME_WAIT, **the driver
//! must prepare the client's network namespace**:
//!
//! ```text
//! sysctl -w net.ipv4.ip_local_port_range="1024 65535"
//! sysctl -w net.ipv4.tcp_tw_reuse=1
//! ```
//!
//! (and flush or size conntrack between runs when a netfilter candidate is
//! measured). Without this a run of a few seconds at tens of thousands of
//! connections per second exhausts the ephemeral ports and shows up as
//! `connect_errors` (EADDRNOTAVAIL).
//!
//! Latencies are kept in a fixed-size log-linear [`Histogram`] per thread
//! (about 58 KiB each, relative error below 0.8 %), so memory does not grow
//! with the run length.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

/// Default request and response size in bytes (the DESIGN's 1-byte CRR).
pub const DEFAULT_SIZE: usize = 1;

/// Default client socket timeout (connect, send and receive).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen backlog of the server socket.
const LISTEN_BACKLOG: i32 = 4096;

/// Stack size of server threads: they only hold a small buffer.
const SERVER_THREAD_STACK: usize = 256 * 1024;

// ---------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------

/// Number of mantissa bits kept per power of two: 2^7 = 128 sub-buckets, so a
/// recorded value is known to within 1/128 (0.78 %).
const PRECISION_BITS: u32 = 7;
const SUB_BUCKETS: u64 = 1 << PRECISION_BITS;
const BUCKET_COUNT: usize = (64 - PRECISION_BITS as usize + 1) * SUB_BUCKETS as usize;

/// Fixed-size log-linear latency histogram (HDR-like) over `u64` values,
/// used with nanoseconds.
///
/// Values below 128 are counted exactly; above that each power of two is
/// split into 128 equal buckets. Memory is constant (7,424 counters) whatever
/// the number of samples, and two histograms merge by adding counters.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("min", &self.min())
            .field("max", &self.max())
            .finish()
    }
}

fn bucket_index(v: u64) -> usize {
    if v < SUB_BUCKETS {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - PRECISION_BITS;
    let top = v >> shift; // in [SUB_BUCKETS, 2 * SUB_BUCKETS)
    ((u64::from(shift) + 1) * SUB_BUCKETS + (top - SUB_BUCKETS)) as usize
}

/// Lowest value and width of bucket `idx`.
fn bucket_bounds(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < SUB_BUCKETS {
        return (idx, 1);
    }
    let shift = idx / SUB_BUCKETS - 1;
    let top = SUB_BUCKETS + idx % SUB_BUCKETS;
    (top << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKET_COUNT],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds every sample of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded samples.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Smallest recorded value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest recorded value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Exact arithmetic mean of the recorded values (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The `q`-quantile (`q` in [0, 1]): the value at rank `ceil(q * n)`,
    /// reported as the middle of its bucket and clamped to [min, max].
    /// Returns 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_bounds(idx);
                let mid = low + (width - 1) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

// ---------------------------------------------------------------------------
// Configuration and report
// ---------------------------------------------------------------------------

/// Transaction pattern of the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Connect, request, response, close; a new connection per transaction.
    Crr,
    /// Request, response on one kept-open connection per thread.
    Rr,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Crr => "crr",
            Mode::Rr => "rr",
        })
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "crr" => Ok(Mode::Crr),
            "rr" => Ok(Mode::Rr),
            other => Err(format!("unknown mode {other:?} (expected crr or rr)")),
        }
    }
}

/// What the client does.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Address to connect to (a service VIP or a pod IP).
    pub target: SocketAddr,
    /// Number of client threads, each running transactions back to back.
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Request and response size in bytes (at least 1).
    pub size: usize,
    /// CRR or RR.
    pub mode: Mode,
    /// Connect/send/receive timeout set on each client socket
    /// (`SO_SNDTIMEO`, which also bounds a blocking connect, and
    /// `SO_RCVTIMEO`); `None` leaves the sockets fully blocking.
    pub timeout: Option<Duration>,
    /// Pin client thread `i` to the `i`-th CPU the process may run on
    /// (round robin). Unpinned threads wander between CPUs and share one
    /// now and then, which spreads repeated runs by ±15 % on a 2-CPU
    /// machine; pinned, by about ±3 %.
    pub pin: bool,
    /// Run only in this client's turns of time slices shared with other
    /// clients, `duration` being the total of its own slices; `None` runs
    /// `duration` at once from the start.
    pub turns: Option<Turns>,
}

impl ClientConfig {
    /// A CRR configuration with the defaults (1 byte, 5 s socket timeout).
    pub fn new(target: SocketAddr, threads: usize, duration: Duration) -> Self {
        ClientConfig {
            target,
            threads,
            duration,
            size: DEFAULT_SIZE,
            mode: Mode::Crr,
            timeout: Some(DEFAULT_TIMEOUT),
            pin: false,
            turns: None,
        }
    }
}

/// Time slices that clients to be compared take in turn, so that each sees
/// the same machine conditions as the others down to a slice: on shared
/// virtual machines the CPU available to a guest drifts by several percent
/// over seconds, which two runs one after the other would each see
/// differently.
///
/// From `epoch_ns` on, time is cut into slices of `slice`; slice `k` belongs
/// to the client whose `turn` is `k % of`. A client starts transactions only
/// in its own slices, so two clients taking turns never compete for the CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Turns {
    /// When slice 0 starts, in nanoseconds of `CLOCK_MONOTONIC`, which every
    /// network namespace of the machine shares ([`monotonic_ns`]).
    pub epoch_ns: u64,
    /// Length of a slice.
    pub slice: Duration,
    /// This client's place in each cycle of `of` slices (0-based).
    pub turn: u32,
    /// Clients taking turns.
    pub of: u32,
}

/// The error a client taking turns reports when it starts after its first
/// slice began (its rate would count time it did not run).
pub const LATE_START: &str = "started after its first slice";

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid, and clock_gettime writes only
    // the one it is given.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The times a client may start transactions: `cycles` slices of
/// `slice_ns`, the `turn`-th of every `of`, from `epoch_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Schedule {
    epoch_ns: u64,
    slice_ns: u64,
    turn: u64,
    of: u64,
    cycles: u64,
}

/// Where a client stands in its [`Schedule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// In one of its slices, which ends at this time.
    Running { until_ns: u64 },
    /// Between its slices; the next starts at this time.
    Waiting { until_ns: u64 },
    /// Past its last slice.
    Done,
}

impl Schedule {
    /// `duration` from `start_ns` in one slice, or, with `turns`, `duration`
    /// rounded to whole slices (at least one).
    fn new(duration: Duration, start_ns: u64, turns: Option<Turns>) -> Self {
        let duration_ns = duration.as_nanos() as u64;
        match turns {
            None => Schedule {
                epoch_ns: start_ns,
                slice_ns: duration_ns.max(1),
                turn: 0,
                of: 1,
                cycles: 1,
            },
            Some(turns) => {
                let slice_ns = (turns.slice.as_nanos() as u64).max(1);
                Schedule {
                    epoch_ns: turns.epoch_ns,
                    slice_ns,
                    turn: u64::from(turns.turn),
                    of: u64::from(turns.of.max(1)),
                    cycles: ((duration_ns + slice_ns / 2) / slice_ns).max(1),
                }
            }
        }
    }

    /// The time this client runs in all.
    fn running_time(&self) -> Duration {
        Duration::from_nanos(self.cycles * self.slice_ns)
    }

    fn slice_start(&self, cycle: u64) -> u64 {
        self.epoch_ns + (cycle * self.of + self.turn) * self.slice_ns
    }

    fn phase(&self, now_ns: u64) -> Phase {
        let Some(since_epoch) = now_ns.checked_sub(self.epoch_ns) else {
            return Phase::Waiting {
                until_ns: self.slice_start(0),
            };
        };
        let slice = since_epoch / self.slice_ns;
        let (cycle, place) = (slice / self.of, slice % self.of);
        let next_cycle = match place.cmp(&self.turn) {
            std::cmp::Ordering::Less => cycle,
            std::cmp::Ordering::Equal if cycle < self.cycles => {
                return Phase::Running {
                    until_ns: self.epoch_ns + (slice + 1) * self.slice_ns,
                }
            }
            _ => cycle + 1,
        };
        if next_cycle >= self.cycles {
            Phase::Done
        } else {
            Phase::Waiting {
                until_ns: self.slice_start(next_cycle),
            }
        }
    }
}

/// Result of one client run. Latencies are per transaction, in microseconds;
/// for CRR a transaction includes the connect and, for RR, it is one
/// request/response exchange.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Transaction pattern.
    pub mode: Mode,
    /// Address the client connected to.
    pub target: String,
    /// Client threads.
    pub threads: usize,
    /// Request and response size in bytes.
    pub size: usize,
    /// Time the client ran transactions (the total of its slices), seconds.
    pub duration_s: f64,
    /// Completed transactions.
    pub transactions: u64,
    /// Transactions per second (connections per second in CRR mode).
    pub tps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 90th percentile latency, µs.
    pub p90_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Smallest latency, µs.
    pub min_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
    /// Failed transactions (`connect_errors + io_errors`).
    pub errors: u64,
    /// Failed connects (refused, timed out, no free local port, ...).
    pub connect_errors: u64,
    /// Failed writes or reads, including short responses and timeouts.
    pub io_errors: u64,
}

impl Report {
    /// One JSON object on one line, for drivers.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} threads={} size={} duration={:.2}s transactions={} tps={:.0} \
             p50={:.1}us p90={:.1}us p99={:.1}us mean={:.1}us max={:.1}us errors={} \
             (connect={} io={})",
            self.mode,
            self.target,
            self.threads,
            self.size,
            self.duration_s,
            self.transactions,
            self.tps,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.mean_us,
            self.max_us,
            self.errors,
            self.connect_errors,
            self.io_errors
        )
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

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
        let mut workers = Vec::with_capacity(cfg.workers.max(1));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 0..128 {
            h.record(v);
        }
        assert_eq!(h.len(), 128);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 127);
        assert_eq!(h.quantile(0.5), 63);
        assert_eq!(h.quantile(1.0), 127);
        assert_eq!(h.quantile(0.0), 0);
    }

    #[test]
    fn histogram_bucket_index_roundtrips() {
        for v in [
            0u64,
            1,
            127,
            128,
            255,
            256,
            1000,
            123_456,
            1 << 40,
            u64::MAX,
        ] {
            let idx = bucket_index(v);
            assert!(idx < BUCKET_COUNT, "{v} -> {idx}");
            let (low, width) = bucket_bounds(idx);
            assert!(low <= v && v - low < width, "{v} in [{low}, +{width})");
            if v >= SUB_BUCKETS {
                // Relative resolution is 1/128.
                assert!(width <= low / SUB_BUCKETS + 1);
            }
        }
        // Buckets are contiguous and increasing.
        let mut next = 0u64;
        for idx in 0..BUCKET_COUNT - 1 {
            let (low, width) = bucket_bounds(idx);
            assert_eq!(low, next, "bucket {idx}");
            next = low + width;
        }
    }

    #[test]
    fn histogram_quantiles_are_within_resolution() {
        let mut h = Histogram::new();
        // 1..=100_000 ns uniformly: p50 ~ 50_000, p99 ~ 99_000.
        for v in 1..=100_000u64 {
            h.record(v);
        }
        let within = |got: u64, want: f64| ((got as f64 - want) / want).abs() < 0.01;
        assert!(within(h.quantile(0.5), 50_000.0), "{}", h.quantile(0.5));
        assert!(within(h.quantile(0.99), 99_000.0), "{}", h.quantile(0.99));
        assert!((h.mean() - 50_000.5).abs() < 1e-6);
    }

    #[test]
    fn histogram_merge_adds_samples() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(10);
        b.record(1_000_000);
        b.record(20);
        a.merge(&b);
        assert_eq!(a.len(), 3);
        assert_eq!(a.min(), 10);
        assert_eq!(a.max(), 1_000_000);
        assert_eq!(a.quantile(0.5), 20);
        assert!(Histogram::new().is_empty());
        assert_eq!(Histogram::new().quantile(0.99), 0);
    }

    #[test]
    fn a_schedule_without_turns_runs_its_duration_once() {
        let schedule = Schedule::new(Duration::from_millis(1500), 1_000, None);
        assert_eq!(schedule.running_time(), Duration::from_millis(1500));
        assert_eq!(
            schedule.phase(1_000),
            Phase::Running {
                until_ns: 1_500_001_000
            }
        );
        assert_eq!(schedule.phase(1_500_000_999), schedule.phase(1_000));
        assert_eq!(schedule.phase(1_500_001_000), Phase::Done);
    }

    #[test]
    fn clients_taking_turns_run_in_disjoint_slices_of_equal_total() {
        let ms = 1_000_000;
        let turns = |turn| Turns {
            epoch_ns: 10 * ms,
            slice: Duration::from_millis(100),
            turn,
            of: 2,
        };
        let first = Schedule::new(Duration::from_millis(290), 0, Some(turns(0)));
        let second = Schedule::new(Duration::from_millis(290), 0, Some(turns(1)));
        for schedule in [first, second] {
            assert_eq!(schedule.running_time(), Duration::from_millis(300));
        }
        // Before the epoch both wait for their first slice.
        assert_eq!(first.phase(0), Phase::Waiting { until_ns: 10 * ms });
        assert_eq!(second.phase(0), Phase::Waiting { until_ns: 110 * ms });
        // Every millisecond of the six slices belongs to exactly one client.
        for t in (10..610).map(|t| t * ms) {
            let running = [first, second]
                .iter()
                .filter(|s| matches!(s.phase(t), Phase::Running { .. }))
                .count();
            assert_eq!(running, 1, "at {t} ns");
        }
        assert_eq!(first.phase(150 * ms), Phase::Waiting { until_ns: 210 * ms });
        assert_eq!(
            second.phase(350 * ms),
            Phase::Running { until_ns: 410 * ms }
        );
        assert_eq!(first.phase(510 * ms), Phase::Done);
        assert_eq!(
            second.phase(510 * ms),
            Phase::Running { until_ns: 610 * ms }
        );
        assert_eq!(second.phase(610 * ms), Phase::Done);
    }

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

    #[test]
    fn mode_parses_and_prints() {
        assert_eq!("CRR".parse::<Mode>().unwrap(), Mode::Crr);
        assert_eq!("rr".parse::<Mode>().unwrap(), Mode::Rr);
        assert!("stream".parse::<Mode>().is_err());
        assert_eq!(Mode::Rr.to_string(), "rr");
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
