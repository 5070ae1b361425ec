//! Hostile and raw clients for attacking the gateway: connections that never speak, HTTP/2
//! connections that stop reading, floods of calls. They talk TCP, TLS and HTTP/2 directly
//! instead of going through tonic, whose good manners would hide what is being tested.
//!
//! Every client binds its socket to a chosen source address before connecting, so that an
//! attacker can come from 127.0.0.2 while a well-behaved member uses 127.0.0.1 (all of
//! 127.0.0.0/8 is loopback on Linux) and per-address limits can be told apart.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The server name every client checks the gateway's certificate against.
const SERVER_NAME: &str = "localhost";

/// An upper bound on one connection attempt: a server whose backlog is full drops SYNs, and the
/// kernel would otherwise retry for minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connection attempts, or calls awaiting their response headers, run at once: enough
/// to be a crowd, few enough not to exhaust the test process's own file descriptors.
const CONCURRENCY: usize = 64;

/// Runs `future` within [`CONNECT_TIMEOUT`], turning the timeout into an I/O error.
async fn within<T>(what: &str, future: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(CONNECT_TIMEOUT, future)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not complete within {CONNECT_TIMEOUT:?}"),
            )
        })?
}

/// Opens a TCP connection to `target` from address `source` (with a kernel-chosen port).
pub async fn connect_tcp(target: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = within(&format!("connecting to {target}"), socket.connect(target)).await?;
    // Like a real client: small gRPC frames must not wait for Nagle's algorithm.
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A client TLS configuration (ALPN `h2`) that trusts the CA of `pki` and presents certificate
/// `cert` of that directory, or no certificate at all when `cert` is `None`.
pub fn client_tls(pki: &Path, cert: Option<&str>) -> Arc<ClientConfig> {
    if let Some(name) = cert {
        let material = TlsMaterial::load(&TlsFiles::in_pki_dir(pki, name)).expect("certificate");
        return tls::client_config(&material, None).expect("client TLS");
    }
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.join("ca.pem")).expect("CA");
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.expect("CA certificate")).expect("CA");
    }
    let mut config = ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Opens a TLS connection to `target` from address `source`, within ten seconds in all.
///
/// With TLS 1.3 the client finishes its handshake before the server has judged the client
/// certificate: a refused certificate shows as a connection the server closes right after.
pub async fn connect_tls(
    target: SocketAddr,
    source: IpAddr,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let server = ServerName::try_from(SERVER_NAME).expect("server name");
    let connect = async {
        let tcp = connect_tcp(target, source).await?;
        TlsConnector::from(config).connect(server, tcp).await
    };
    within(&format!("TLS connection to {target}"), connect).await
}

/// Connections that were opened and then left without a word, to see whether the server
/// closes them and how fast.
pub struct Silent {
    // Only reading is needed: it is how a close by the server is noticed.
    connections: Vec<Box<dyn AsyncRead + Send + Unpin>>,
}

impl Silent {
    /// How many connections were opened.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// Whether no connection could be opened at all.
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Reads all connections at once for at most `within` and returns how many the server
    /// closed in that time (end of stream, TLS close_notify, reset or any other error). What
    /// the server sends before closing (an HTTP/2 SETTINGS frame, a GOAWAY) is read and
    /// ignored; connections still open at the deadline are not counted.
    pub async fn closed_by_server(self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        let mut reads: FuturesUnordered<_> = self
            .connections
            .into_iter()
            .map(|mut connection| async move {
                let mut buffer = [0u8; 1024];
                let closed = async {
                    loop {
                        match connection.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                };
                tokio::time::timeout_at(deadline, closed).await.is_ok()
            })
            .collect();
        let mut closed = 0;
        while let Some(was_closed) = reads.next().await {
            closed += usize::from(was_closed);
        }
        closed
    }
}

/// Opens `count` connections with `connect`, [`CONCURRENCY`] at a time, and keeps those that
/// were opened: a server that refuses some of them is what some tests want to see.
async fn open_silent<C, F>(count: usize, connect: impl Fn() -> F) -> Silent
where
    C: AsyncRead + Send + Unpin + 'static,
    F: Future<Output = io::Result<C>>,
{
    let connections = futures_util::stream::iter((0..count).map(|_| connect()))
        .buffer_unordered(CONCURRENCY)
        .filter_map(|opened| async move {
            opened
                .ok()
                .map(|c| Box::new(c) as Box<dyn AsyncRead + Send + Unpin>)
        })
        .collect()
        .await;
    Silent { connections }
}

/// Opens up to `count` TCP connections to `target` from `source` that never send a byte, not
/// even a TLS ClientHello.
pub async fn silent_tcp(target: SocketAddr, source: IpAddr, count: usize) -> Silent {
    open_silent(count, || connect_tcp(target, source)).await
}

/// Opens up to `count` TLS connections to `target` from `source` that complete the handshake
/// and then never send the HTTP/2 connection preface.
pub async fn silent_tls(
    target: SocketAddr,
    source: IpAddr,
    config: Arc<ClientConfig>,
    count: usize,
) -> Silent {
    open_silent(count, || connect_tls(target, source, config.clone())).await
}

/// The body of a unary gRPC request: an uncompressed length-prefixed message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let length = u32::try_from(message.len()).expect("a gRPC message under 4 GiB");
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(length);
    frame.put_slice(message);
    frame.freeze()
}

/// The encoded form of a protobuf message, to be sent with [`RawH2::start_call`].
pub fn grpc_message<M: prost::Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}

/// An HTTP/2 connection driven by hand, with a receive window of the caller's choosing: a
/// member whose calls' responses can be left unread so that the server's sends block.
pub struct RawH2 {
    send: h2::client::SendRequest<Bytes>,
    // The connection runs as long as the handle or any call's stream is alive; it is kept so
    // that the task is not detached from the value that owns it.
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

/// What came of a flood of calls on one connection (see [`RawH2::flood`]).
/// `answered + refused + unsent` is the number of calls asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FloodOutcome {
    /// Calls whose response headers arrived, successful or not.
    pub answered: usize,
    /// The `grpc-status` codes of answered calls that failed at once (trailers-only
    /// responses), by code, with how many calls got each. Calls answered with `200` and no
    /// status in the headers are in `answered` alone.
    pub statuses: BTreeMap<String, usize>,
    /// Calls that HTTP/2 refused: a stream reset (`REFUSED_STREAM` and the like), a GOAWAY,
    /// a lost connection, or a stream that could not be opened any more.
    pub refused: usize,
    /// Calls never attempted because the connection had failed.
    pub unsent: usize,
}

/// Opens a TLS connection to `target` from `source` and starts HTTP/2 on it, advertising
/// `initial_window` bytes as the receive window of each call.
pub async fn raw_h2(
    target: SocketAddr,
    source: IpAddr,
    config: Arc<ClientConfig>,
    initial_window: u32,
) -> io::Result<RawH2> {
    let tls = connect_tls(target, source, config).await?;
    // A connection window below the default would stall calls that are meant to be read; it is
    // the per-call window that the tests play with.
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(initial_window)
        .initial_connection_window_size(initial_window.max(65_535))
        .handshake(tls)
        .await
        .map_err(io::Error::other)?;
    Ok(RawH2 {
        send,
        connection: tokio::spawn(connection),
    })
}

impl RawH2 {
    /// Waits at most `within` for the server to end the connection (this side keeps it open);
    /// returns whether it did.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.connection)
            .await
            .is_ok()
    }

    /// Sends a unary gRPC request to `path` (`/package.Service/Method`) with `message` (an
    /// encoded protobuf message) as its body, and returns the pending response.
    pub async fn start_call(
        &mut self,
        path: &str,
        message: &[u8],
    ) -> Result<h2::client::ResponseFuture, h2::Error> {
        // The readied handle is kept: it remembers a stream still queued behind the server's
        // concurrency limit, so that the next call waits for it instead of queueing without
        // bound.
        self.send = self.send.clone().ready().await?;
        let request = http::Request::post(format!("https://{SERVER_NAME}{path}"))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .expect("a valid request");
        let (response, mut body) = self.send.send_request(request, false)?;
        body.send_data(grpc_frame(message), true)?;
        Ok(response)
    }

    /// Starts `count` calls, waits for the response headers of each and returns the response
    /// bodies unread, so that their windows fill up and stay closed for as long as the bodies
    /// are kept. Panics if a call fails or is refused (a status other than 200, or a
    /// trailers-only response carrying a `grpc-status`).
    pub async fn stall(&mut self, path: &str, message: &[u8], count: usize) -> Vec<h2::RecvStream> {
        let mut responses = Vec::with_capacity(count);
        for call in 0..count {
            let response = self
                .start_call(path, message)
                .await
                .unwrap_or_else(|error| panic!("call {call} to {path} could not start: {error}"));
            responses.push(response);
        }
        let mut bodies = Vec::with_capacity(count);
        for (call, response) in responses.into_iter().enumerate() {
            let response = response
                .await
                .unwrap_or_else(|error| panic!("call {call} to {path} got no response: {error}"));
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            };
            if response.status() != http::StatusCode::OK || header("grpc-status").is_some() {
                panic!(
                    "call {call} to {path} was refused: HTTP {}, grpc-status {:?}, \
                     grpc-message {:?}",
                    response.status(),
                    header("grpc-status"),
                    header("grpc-message"),
                );
            }
            bodies.push(response.into_body());
        }
        bodies
    }

    /// Sends `count` calls as fast as the connection takes them, with at most 64
    /// awaiting their response headers, and tells how they were received. Sending stops at the
    /// first call that cannot be started, which means the connection is gone.
    ///
    /// Only the response headers are awaited: the rest of each response is dropped, which
    /// resets its stream (CANCEL) if the server has not finished it yet.
    pub async fn flood(&mut self, path: &str, message: &[u8], count: usize) -> FloodOutcome {
        let mut outcome = FloodOutcome::default();
        let mut pending = FuturesUnordered::new();
        let mut attempted = 0;
        let mut connection_lost = false;
        loop {
            if !connection_lost && attempted < count && pending.len() < CONCURRENCY {
                attempted += 1;
                match self.start_call(path, message).await {
                    Ok(response) => pending.push(response),
                    Err(_) => {
                        outcome.refused += 1;
                        connection_lost = true;
                    }
                }
                continue;
            }
            let Some(answer) = pending.next().await else {
                break;
            };
            match answer {
                Ok(response) => {
                    outcome.answered += 1;
                    if let Some(status) = response.headers().get("grpc-status") {
                        let status = String::from_utf8_lossy(status.as_bytes()).into_owned();
                        *outcome.statuses.entry(status).or_default() += 1;
                    }
                }
                Err(error) => {
                    outcome.refused += 1;
                    // A reset concerns one stream; anything else (GOAWAY, I/O) the connection.
                    if !error.is_reset() {
                        connection_lost = true;
                    }
                }
            }
        }
        outcome.unsent = count - attempted;
        outcome
    }
}
