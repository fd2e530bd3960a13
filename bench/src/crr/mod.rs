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

mod client;
mod config;
mod histogram;
mod server;

use std::time::Duration;

pub use client::run_client;
pub use config::{monotonic_ns, ClientConfig, Mode, Report, Turns, LATE_START};
pub use histogram::Histogram;
pub use server::{Server, ServerConfig, ServerStats};

/// Default request and response size in bytes (the DESIGN's 1-byte CRR).
pub const DEFAULT_SIZE: usize = 1;

/// Default client socket timeout (connect, send and receive).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
