//! The HTTP servers for `/healthz`, `/livez`, `/metrics` and
//! healthCheckNodePorts, on hyper: each connection has one deadline for its
//! whole life and a cap on its request head, so slow or endless clients
//! cannot hold a server (a kubelet probe or a cloud load balancer's health
//! check keeps its answer). Servers share one small runtime of their own,
//! apart from the agent's main loop and the API watches.

use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener as StdListener},
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, runtime::Runtime, sync::Semaphore, task::JoinHandle};
use tracing::warn;

/// How long one connection may live, request and response included: a
/// client that sends a byte every few seconds is cut off here.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client gets to send a request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest request head read (probes and scrapes send a few hundred
/// bytes); a longer one ends the connection.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections served at once per server; more wait for a slot (each slot
/// is freed within [`CONNECTION_DEADLINE`]).
const MAX_CONNECTIONS: usize = 256;

/// A response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    fn not_found() -> Self {
        Self {
            status: 404,
            content_type: "text/plain",
            body: "not found\n".into(),
        }
    }
}

/// Answers a request path; `None` means 404.
pub type Handler = Arc<dyn Fn(&str) -> Option<Response> + Send + Sync>;

/// The runtime every server runs on: two threads, so a busy scrape does
/// not delay a probe.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lb-http")
            .enable_all()
            .build()
            .expect("the HTTP runtime starts")
    })
}

/// A running server; stops listening when dropped.
pub struct Server {
    accept: JoinHandle<()>,
    addr: SocketAddr,
}

impl Server {
    /// Binds `addr` (an error here is the caller's to report) and serves
    /// `handler` on the servers' runtime.
    pub fn start(addr: SocketAddr, handler: Handler) -> std::io::Result<Self> {
        let listener = StdListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = runtime();
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let accept = runtime.spawn(accept_loop(listener, handler));
        Ok(Self { accept, addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Aborting the accept task drops the listener: the port closes.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, handler: Handler) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                warn!(error = %err, "accepting an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(&handler, request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // Past the deadline the connection is dropped, whatever state
            // it is in.
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

fn answer(handler: &Handler, path: &str) -> hyper::Response<Full<Bytes>> {
    let response = handler(path).unwrap_or_else(Response::not_found);
    hyper::Response::builder()
        .status(response.status)
        .header(header::CONTENT_TYPE, response.content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(Full::new(Bytes::from(response.body)))
        .unwrap_or_else(|_| {
            let mut fallback = hyper::Response::new(Full::new(Bytes::from_static(b"")));
            *fallback.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            fallback
        })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        thread,
        time::Instant,
    };

    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    fn healthz() -> Handler {
        Arc::new(|path| (path == "/healthz").then(|| Response::json(200, "{}".into())))
    }

    #[test]
    fn serves_paths_and_404s_the_rest_on_loopback() {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), healthz()).unwrap();
        let ok = get(server.local_addr(), "/healthz?verbose");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\n{}"), "{ok}");
        assert!(ok.contains("content-type: application/json"), "{ok}");
        assert!(get(server.local_addr(), "/nope").starts_with("HTTP/1.1 404"));
        let addr = server.local_addr();
        drop(server);
        thread::sleep(Duration::from_millis(100));
        assert!(
            TcpStream::connect(addr).is_err(),
            "a dropped server stops listening"
        );
    }

    /// 64 clients trickling a byte every second (twice the old server's
    /// connection limit) and one sending an endless header line do not
    /// keep a probe from its answer, and are cut off.
    #[test]
    fn slow_and_endless_clients_do_not_starve_a_probe() {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), healthz()).unwrap();
        let addr = server.local_addr();
        let mut slow: Vec<TcpStream> = (0..64)
            .map(|_| {
                let mut stream = TcpStream::connect(addr).expect("connect");
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\n")
                    .expect("write");
                stream
            })
            .collect();
        let endless = thread::spawn(move || {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nX-Long: ")
                .expect("write");
            let chunk = [b'a'; 4096];
            let mut sent = 0usize;
            while stream.write_all(&chunk).is_ok() && sent < 64 << 20 {
                sent += chunk.len();
            }
            sent
        });
        let started = Instant::now();
        for _ in 0..3 {
            for stream in &mut slow {
                let _ = stream.write_all(b"X");
            }
            let answer = get(addr, "/healthz");
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            thread::sleep(Duration::from_secs(1));
        }
        assert!(started.elapsed() < Duration::from_secs(6));
        let sent = endless.join().expect("endless client");
        assert!(
            sent < 64 << 20,
            "the endless header was cut off after {sent} bytes"
        );
        thread::sleep(CONNECTION_DEADLINE);
        // Every trickling client was cut off: end of stream, a reset, or a
        // 4xx answer, never a connection still waiting for more.
        let mut buf = [0u8; 64];
        for stream in &mut slow {
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            match stream.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => assert!(buf[..n].starts_with(b"HTTP/1.1 4"), "{:?}", &buf[..n]),
                Err(err) => assert!(
                    !matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "a slow client is still connected after the deadline"
                ),
            }
        }
    }
}
