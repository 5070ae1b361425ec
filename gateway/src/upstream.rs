//! The services behind the gateway. Each route is a small pool of HTTP/2 connections over
//! internal mutual TLS, spread over every address its names resolve to (re-resolved
//! periodically, so replicas that come and go are followed), each connection used directly by
//! the calls on it (no queue or worker task in between) and remade when lost. A replica that
//! cannot be reached is skipped, and tried again after a back-off.
//!
//! The server's certificate must name the SPIFFE identity of the platform component the route
//! belongs to: callers' headers and data go to nobody else.
//!
//! Flow control is set so that what one caller does not read cannot hold back another caller:
//! each call's stream window is small and the connection's window is large enough for every
//! call that can be in flight at once to fill its own, so the connection window is never the
//! one that runs out. What a stalled call holds is one stream window of memory.
//!
//! A watcher mirrors each service's health into the gateway's own health service.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use onestop_platform::client;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// The flow-control window of one forwarded call, in bytes: what a caller that stops reading
/// leaves buffered in the gateway.
pub const CALL_WINDOW: u32 = 256 * 1024;
/// The flow-control window of one upstream connection: the largest HTTP/2 allows, far more than
/// every call in flight can hold with [`CALL_WINDOW`] each.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Calls in flight on one connection past which the next call goes to another connection of the
/// same replica.
const SPILL_OVER: usize = 128;

/// The largest header block (response headers or trailers) accepted from a service. Services
/// bound what their errors quote far below this, so a status never gets lost on the way.
pub const MAX_RESPONSE_HEADERS: u32 = 64 * 1024;

/// Why an upstream is unusable.
#[derive(Debug, thiserror::Error)]
#[error("upstream {service}: {message}")]
pub struct UpstreamError {
    service: String,
    message: String,
}

/// Why one call could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No replica could be connected to.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The connection failed during the call.
    #[error("connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// How to reach one service.
pub struct UpstreamSettings {
    /// `host:port` names of its replicas.
    pub addresses: Vec<String>,
    /// The DNS name its certificates are checked against.
    pub server_name: String,
    /// A client configuration that checks the service's SPIFFE identity.
    pub tls: Arc<ClientConfig>,
    /// Connections kept to each address.
    pub connections_per_address: usize,
    /// How often idle connections are pinged.
    pub keepalive: Duration,
}

/// One service behind the gateway.
pub struct Upstream {
    /// The gRPC service name, such as `onestop.forms.v1.FormsService`.
    pub service: String,
    addresses: Vec<String>,
    /// The `:authority` of forwarded calls: the route's first name.
    authority: http::uri::Authority,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    keepalive: Duration,
    per_address: usize,
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    next: AtomicUsize,
}

/// One resolved address of a service, with its connections.
struct Replica {
    address: SocketAddr,
    connections: Vec<Connection>,
    /// Skipped until then after a failed connect.
    down_until: Mutex<Option<Instant>>,
    failures: AtomicU32,
}

#[derive(Default)]
struct Connection {
    /// Calls in flight on it (until their responses end).
    in_flight: Arc<AtomicUsize>,
    /// The live connection's handle; cloning it is cheap.
    current: Mutex<Option<SendRequest<Body>>>,
    /// Held while the connection is being made, so that a burst of calls makes one, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl Replica {
    fn new(address: SocketAddr, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            address,
            connections: (0..per_address.max(1))
                .map(|_| Connection::default())
                .collect(),
            down_until: Mutex::new(None),
            failures: AtomicU32::new(0),
        })
    }

    fn is_down(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .map(|until| until.is_some_and(|until| until > now))
            .unwrap_or(false)
    }

    fn failed(&self) {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel).min(5);
        let backoff = Duration::from_millis(500) * (1 << failures);
        if let Ok(mut until) = self.down_until.lock() {
            *until = Some(Instant::now() + backoff.min(Duration::from_secs(30)));
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
        if let Ok(mut until) = self.down_until.lock() {
            *until = None;
        }
    }
}

impl Connection {
    fn live(&self) -> Option<SendRequest<Body>> {
        let current = self.current.lock().ok()?;
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

impl Upstream {
    /// Prepares the connections to a service; the names are resolved by [`Upstream::resolve`],
    /// and connections are made on first use and remade when lost.
    pub fn new(service: &str, settings: UpstreamSettings) -> Result<Self, UpstreamError> {
        let error = |message: String| UpstreamError {
            service: service.to_owned(),
            message,
        };
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|e| error(format!("server name `{}`: {e}", settings.server_name)))?;
        if settings.addresses.is_empty() {
            return Err(error("no addresses".into()));
        }
        let mut authorities = Vec::new();
        for address in &settings.addresses {
            let authority: http::uri::Authority = address
                .parse()
                .ok()
                .filter(|a: &http::uri::Authority| a.port_u16().is_some())
                .ok_or_else(|| error(format!("`{address}` is not a host:port address")))?;
            authorities.push(authority);
        }
        Ok(Self {
            service: service.to_owned(),
            authority: authorities.swap_remove(0),
            addresses: settings.addresses,
            server_name,
            tls: TlsConnector::from(settings.tls),
            keepalive: settings.keepalive,
            per_address: settings.connections_per_address,
            replicas: RwLock::new(Arc::new(Vec::new())),
            next: AtomicUsize::new(0),
        })
    }

    /// Resolves the route's names; the replicas of addresses still there keep their
    /// connections. A name that does not resolve now leaves the others in use.
    pub async fn resolve(&self) {
        let mut found = Vec::new();
        for address in &self.addresses {
            match tokio::net::lookup_host(address.as_str()).await {
                Ok(addresses) => found.extend(addresses),
                Err(error) => {
                    tracing::warn!(service = %self.service, %address, %error, "cannot resolve");
                }
            }
        }
        found.sort();
        found.dedup();
        if found.is_empty() {
            // Keep what was known rather than forget every replica over a DNS hiccup.
            return;
        }
        let old = self.replicas();
        let replicas: Vec<_> = found
            .into_iter()
            .map(|address| {
                old.iter()
                    .find(|replica| replica.address == address)
                    .cloned()
                    .unwrap_or_else(|| Replica::new(address, self.per_address))
            })
            .collect();
        if let Ok(mut current) = self.replicas.write() {
            *current = Arc::new(replicas);
        }
    }

    /// Re-resolves the route's names every `interval` until `shutdown`.
    pub fn keep_resolving(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let upstream = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval.max(Duration::from_secs(1)));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => upstream.resolve().await,
                }
            }
        });
    }

    fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .map(|replicas| replicas.clone())
            .unwrap_or_default()
    }

    /// Sends one call and returns the response as soon as its headers arrive; the body follows
    /// frame by frame. Calls are spread over the replicas and their connections in turn. A
    /// replica that cannot be connected to is skipped, and so is a connection found dead before
    /// the call was written to it (the call is given back and goes to the next one); a call
    /// already written when its connection fails is not repeated, since the service may have
    /// acted on it.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Answer>, SendError> {
        let attempts = self.replicas().len().max(1) * self.per_address.max(1) + 1;
        let mut attempt = 1;
        loop {
            let (mut sender, in_flight) = self.sender().await.map_err(SendError::Connect)?;
            let counted = InFlight::enter(in_flight);
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|body| Answer {
                        body,
                        _counted: counted,
                        ended: false,
                    }));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if attempt < attempts => {
                        tracing::debug!(service = %self.service, error = %error.error(), "connection lost before sending; trying another");
                        request = unsent;
                        attempt += 1;
                    }
                    _ => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }

    /// A connection for the next call: replicas take turns (a replica that failed lately
    /// comes last); within a replica, the first connection that is not busy is used, so that at
    /// low load calls share one connection and its writes, and the others take the overflow.
    async fn sender(&self) -> std::io::Result<(SendRequest<Body>, Arc<AtomicUsize>)> {
        if self.replicas().is_empty() {
            self.resolve().await;
        }
        let replicas = self.replicas();
        if replicas.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no address of {} resolves", self.service),
            ));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % replicas.len();
        let now = Instant::now();
        let turn = replicas[start..].iter().chain(&replicas[..start]);
        let (up, down): (Vec<_>, Vec<_>) = turn.partition(|replica| !replica.is_down(now));
        let mut last_error = None;
        for replica in up.into_iter().chain(down) {
            let connection = replica
                .connections
                .iter()
                .find(|connection| connection.in_flight.load(Ordering::Relaxed) < SPILL_OVER)
                .or_else(|| {
                    replica
                        .connections
                        .iter()
                        .min_by_key(|connection| connection.in_flight.load(Ordering::Relaxed))
                });
            let Some(connection) = connection else {
                continue;
            };
            match self.connect_slot(replica, connection).await {
                Ok(sender) => return Ok((sender, connection.in_flight.clone())),
                Err(error) => {
                    tracing::warn!(service = %self.service, address = %replica.address, %error, "replica unreachable");
                    replica.failed();
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("every replica of {} is down", self.service),
            )
        }))
    }

    async fn connect_slot(
        &self,
        replica: &Replica,
        connection: &Connection,
    ) -> std::io::Result<SendRequest<Body>> {
        if let Some(sender) = connection.live() {
            return Ok(sender);
        }
        let _connecting = connection.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some(sender) = connection.live() {
            return Ok(sender);
        }
        let sender = self.connect(replica.address).await?;
        replica.succeeded();
        if let Ok(mut current) = connection.current.lock() {
            *current = Some(sender.clone());
        }
        Ok(sender)
    }

    async fn connect(&self, address: SocketAddr) -> std::io::Result<SendRequest<Body>> {
        let tls = client::dial(&address.to_string(), self.server_name.clone(), &self.tls).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(CALL_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_RESPONSE_HEADERS)
            .keep_alive_interval(self.keepalive)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        let service = self.service.clone();
        let open = crate::metrics::gateway()
            .upstream_connections
            .get_or_create_owned(&crate::metrics::Upstream {
                service: service.clone(),
            });
        open.inc();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::info!(%service, %address, %error, "upstream connection closed");
            }
            open.dec();
        });
        Ok(sender)
    }

    /// The request's path on this upstream: HTTP/2 needs a scheme and an authority.
    pub fn uri_for(&self, uri: &http::Uri) -> http::Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }

    /// Mirrors the service's own health (`Health/Watch`) into `reporter` until `shutdown`,
    /// reporting NOT_SERVING while the service cannot be reached.
    pub fn watch_health(self: &Arc<Self>, reporter: HealthReporter, shutdown: CancellationToken) {
        let upstream = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let watched = tokio::select! {
                    () = shutdown.cancelled() => return,
                    watched = upstream.mirror_health(&reporter) => watched,
                };
                if watched {
                    // It was up: a restart is retried quickly again.
                    backoff = Duration::from_millis(100);
                }
                reporter
                    .set_service_status(&upstream.service, ServingStatus::NotServing)
                    .await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Mirrors the health stream until it ends; returns whether it was ever received.
    async fn mirror_health(self: &Arc<Self>, reporter: &HealthReporter) -> bool {
        let mut client = HealthClient::new(Client(self.clone()));
        let request = tonic_health::pb::HealthCheckRequest {
            service: self.service.clone(),
        };
        let mut stream = match client.watch(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!(service = %self.service, %status, "health watch failed");
                return false;
            }
        };
        while let Ok(Some(update)) = stream.message().await {
            let status = match update.status() {
                WireStatus::Serving => ServingStatus::Serving,
                WireStatus::NotServing | WireStatus::ServiceUnknown => ServingStatus::NotServing,
                WireStatus::Unknown => ServingStatus::Unknown,
            };
            reporter.set_service_status(&self.service, status).await;
        }
        true
    }
}

/// One call counted among its connection's calls in flight.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service's answer, counted on its connection until it has been read or dropped.
///
/// When the connection fails after the answer has begun (the replica died mid-call), the
/// answer ends with `UNAVAILABLE` trailers of the platform's shape instead of an error: the
/// caller gets a status it can act on, where an error would reset its stream with HTTP/2's
/// `INTERNAL_ERROR` and reach it as `INTERNAL`.
pub struct Answer {
    body: Incoming,
    _counted: InFlight,
    ended: bool,
}

impl http_body::Body for Answer {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Err(error)) => {
                self.ended = true;
                tracing::warn!(%error, "connection to a service lost during a call");
                Poll::Ready(Some(Ok(http_body::Frame::trailers(lost_during_call()))))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The trailers of a call whose service connection was lost after the answer began.
fn lost_during_call() -> http::HeaderMap {
    let status = onestop_platform::status::with_details(
        tonic::Code::Unavailable,
        crate::DOMAIN,
        "UPSTREAM_LOST",
        "the connection to the service was lost during the call; the service may or may not \
         have acted on it"
            .into(),
        Vec::new(),
    );
    let mut trailers = http::HeaderMap::new();
    // Fails only for a message that cannot be a header, which this fixed one can.
    let _ = status.add_header(&mut trailers);
    trailers
}

/// The upstream as a tonic transport, for the gateway's own calls to it (health, key sets).
#[derive(Clone)]
pub struct Client(pub Arc<Upstream>);

impl tower::Service<Request<Body>> for Client {
    type Response = Response<Answer>;
    type Error = SendError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Answer>, SendError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let upstream = self.0.clone();
        Box::pin(async move {
            *request.uri_mut() = upstream.uri_for(request.uri());
            upstream.send(request).await
        })
    }
}
