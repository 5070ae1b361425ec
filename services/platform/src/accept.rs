//! The accept loop every server runs: TCP connections admitted under explicit limits, TLS
//! handshakes completed concurrently, and the peer's identity read once.
//!
//! An attacker needs no certificate to open connections, so every limit here holds before
//! anyone is identified:
//! - `max_connections` open at once in total (handshaking or not), below the process's file
//!   descriptors, so that running out of descriptors is not how overload shows;
//! - `max_pending_handshakes` handshakes at once, each within `handshake_timeout`;
//! - per source address, `max_unidentified_per_source` connections that have not (yet) shown a
//!   member's or component's certificate (a new one displaces the oldest that has sent nothing), and
//!   `handshakes_per_source_per_second` connections that come to nothing (see [`Sources`]).
//!
//! A connection over a limit is closed at once, never queued: a queue would only turn an attack
//! into latency for everyone. A failed `accept` (out of descriptors) backs off before trying
//! again instead of spinning.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::tls::{self, Peer, PeerIdentity, ServerTls};

/// Limits of the accept loop (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once.
    pub max_pending_handshakes: usize,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections from one address without an identified peer (handshaking, or presenting no
    /// usable certificate).
    pub max_unidentified_per_source: usize,
    /// New connections a second from one address (bursts of twice that).
    pub handshakes_per_source_per_second: u32,
}

impl From<&Limits> for AcceptLimits {
    fn from(limits: &Limits) -> Self {
        Self {
            handshake_timeout: limits.handshake_timeout_ms,
            max_pending_handshakes: limits.max_pending_handshakes,
            max_connections: limits.max_connections,
            max_unidentified_per_source: limits.max_unidentified_per_source,
            handshakes_per_source_per_second: limits.handshakes_per_source_per_second,
        }
    }
}

/// How long a connection whose certificate was revoked (or expired) stays open: long enough
/// for its streams to be told why, in a status (see [`crate::streams::certificate_unusable`]).
pub const CUT_OFF_GRACE: Duration = Duration::from_secs(1);

/// A TLS connection whose handshake succeeded, with the peer read once. It holds its place
/// under the connection limits until it is dropped, and it is cut off [`CUT_OFF_GRACE`] after
/// its certificate is revoked or expires: from then on reading and writing it fail, so that
/// whatever serves it ends every call on it.
pub struct MtlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
    cut_off: CutOff,
    source: Arc<Sources>,
    _connection: OwnedSemaphorePermit,
    _unidentified: Option<SourceSlot>,
}

/// When a connection is cut off.
enum CutOff {
    /// Its certificate may still become unusable.
    Pending(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// It has no certificate to lose (a stranger's connection, closed after one refusal).
    Never,
    /// It has been cut off.
    Done,
}

impl CutOff {
    fn new(tls: &Arc<ServerTls>, peer: &Peer) -> Self {
        match &peer.cert {
            Some(cert) => {
                let (tls, cert) = (tls.clone(), cert.clone());
                let remote_addr = peer.remote_addr;
                CutOff::Pending(Box::pin(async move {
                    let why = crate::streams::certificate_unusable(tls, cert).await;
                    tokio::time::sleep(CUT_OFF_GRACE).await;
                    tracing::info!(%remote_addr, why, "connection cut off");
                }))
            }
            None => CutOff::Never,
        }
    }

    /// An error once the connection is cut off.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let CutOff::Pending(cut) = self {
            if cut.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            *self = CutOff::Done;
        }
        match self {
            CutOff::Done => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's certificate is no longer valid",
            )),
            _ => Ok(()),
        }
    }
}

impl MtlsStream {
    /// The peer of this connection.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Counts this connection against its source address's budget of handshakes that come to
    /// nothing, as if it had shown no certificate: for a member that connects far more often
    /// than it may, so that its address's next connections are refused before their handshake.
    pub fn charge_source(&self) {
        self.source.charge(self.peer.remote_addr.ip());
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.cut_off.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cut_off.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cut_off.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for MtlsStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// What is known of each source address before its connections are identified: its places for
/// unidentified connections and its budget of handshakes that came to nothing.
///
/// Many members may share one address (a municipality's network behind one NAT address), so
/// nothing a member does with a certificate that names it is held against its address: only
/// connections that end unidentified (a failed or timed-out handshake, no member's certificate)
/// spend the address's budget, and a new connection from an address whose places are all taken
/// displaces the oldest one that has not even sent its TLS hello instead of being refused. A
/// client that opens connections and never speaks thus holds each place only until the next
/// connection from its address comes, and cannot shut out the address's other users; a real
/// handshake in progress is never cut short by newcomers.
struct Sources {
    per_second: f64,
    burst: f64,
    states: Mutex<HashMap<IpAddr, Source>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Source {
    /// Unidentified connections, oldest first; `displace` is there until the client's hello.
    places: std::collections::VecDeque<Place>,
    /// Handshakes that may still come to nothing (a token bucket).
    budget: f64,
    refilled: tokio::time::Instant,
}

struct Place {
    id: u64,
    displace: Option<CancellationToken>,
}

/// One connection's place under its source's count, given back when dropped.
struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
    id: u64,
}

impl Sources {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self {
            per_second,
            burst: per_second * 2.0,
            states: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Source>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a new connection from `ip`, displacing the oldest one still
    /// handshaking when all `max` are taken; `None` when the address spent its budget of failed
    /// handshakes or every place holds an established connection. The token is cancelled when
    /// the connection is displaced.
    fn enter(
        self: &Arc<Self>,
        ip: IpAddr,
        max: usize,
    ) -> Result<(SourceSlot, CancellationToken), &'static str> {
        let now = tokio::time::Instant::now();
        let mut states = self.lock();
        let source = states.entry(ip).or_insert_with(|| Source {
            places: std::collections::VecDeque::new(),
            budget: self.burst,
            refilled: now,
        });
        let earned = now.duration_since(source.refilled).as_secs_f64() * self.per_second;
        source.budget = (source.budget + earned).min(self.burst);
        source.refilled = now;
        if source.budget < 1.0 {
            return Err("handshakes_per_source_per_second");
        }
        if source.places.len() >= max.max(1) {
            let oldest = source.places.iter().position(|p| p.displace.is_some());
            match oldest.and_then(|at| source.places.remove(at)) {
                Some(place) => {
                    if let Some(displace) = place.displace {
                        displace.cancel();
                    }
                }
                None => return Err("max_unidentified_per_source"),
            }
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let displace = CancellationToken::new();
        source.places.push_back(Place {
            id,
            displace: Some(displace.clone()),
        });
        let slot = SourceSlot {
            sources: self.clone(),
            ip,
            id,
        };
        Ok((slot, displace))
    }

    /// Forgets addresses with no connection whose budget is full again.
    fn forget_idle(&self) {
        let now = tokio::time::Instant::now();
        let (per_second, burst) = (self.per_second, self.burst);
        self.lock().retain(|_, source| {
            let earned = now.duration_since(source.refilled).as_secs_f64() * per_second;
            !source.places.is_empty() || source.budget + earned < burst
        });
    }
}

impl Sources {
    fn charge(&self, ip: IpAddr) {
        if let Some(source) = self.lock().get_mut(&ip) {
            source.budget -= 1.0;
        }
    }
}

impl SourceSlot {
    /// The client has sent its hello: a handshake is under way, and the connection can no
    /// longer be displaced.
    fn hello_received(&self) {
        if let Some(source) = self.sources.lock().get_mut(&self.ip)
            && let Some(place) = source.places.iter_mut().find(|p| p.id == self.id)
        {
            place.displace = None;
        }
    }

    /// The connection came to nothing (a failed handshake, or no member's certificate): it
    /// spends its address's budget.
    fn charge(&self) {
        self.sources.charge(self.ip);
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut states = self.sources.lock();
        if let Some(source) = states.get_mut(&self.ip)
            && let Some(at) = source.places.iter().position(|p| p.id == self.id)
        {
            source.places.remove(at);
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding connections until
/// `shutdown` is cancelled. A failed handshake (unknown CA, expired or revoked certificate, no
/// TLS at all) is logged and dropped; it never stops the loop.
pub fn accept(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    trust_domain: String,
    limits: AcceptLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<MtlsStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(limits.max_pending_handshakes.max(1));
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes.max(1)));
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = Arc::new(Sources::new(limits.handshakes_per_source_per_second));
    let trust_domain: Arc<str> = trust_domain.into();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(10);
        let mut forget = tokio::time::interval(Duration::from_secs(60));
        loop {
            let (tcp, remote_addr) = tokio::select! {
                () = shutdown.cancelled() => break,
                _ = forget.tick() => {
                    sources.forget_idle();
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => {
                        backoff = Duration::from_millis(10);
                        accepted
                    }
                    Err(error) => {
                        // Out of descriptors and the like: the pending connection stays in
                        // the backlog; try again after a pause that grows while it lasts.
                        tracing::warn!(%error, ?backoff, "accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let ip = remote_addr.ip();
            let refused = |why: &str| tracing::debug!(%remote_addr, why, "connection refused");
            let Ok(connection) = connections.clone().try_acquire_owned() else {
                refused("max_connections");
                continue;
            };
            let (unidentified, displaced) =
                match sources.enter(ip, limits.max_unidentified_per_source) {
                    Ok(entered) => entered,
                    Err(why) => {
                        refused(why);
                        continue;
                    }
                };
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                refused("max_pending_handshakes");
                continue;
            };
            // gRPC is many small messages; Nagle's algorithm would add delay to each.
            let _ = tcp.set_nodelay(true);
            let config = tls.config();
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            let tls = tls.clone();
            let sources = sources.clone();
            tokio::spawn(async move {
                // In two steps: a client that has sent its hello is a real handshake in
                // progress, which no newcomer displaces; one that has sent nothing may be.
                let handshake_made = async {
                    let hello = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    )
                    .await?;
                    unidentified.hello_received();
                    hello.into_stream(config).await
                };
                let accepted = tokio::select! {
                    accepted = tokio::time::timeout(limits.handshake_timeout, handshake_made) => accepted,
                    () = displaced.cancelled() => {
                        tracing::info!(%remote_addr, "handshake displaced by a newer connection from the same address");
                        unidentified.charge();
                        return;
                    }
                };
                drop(handshake);
                let stream = match accepted {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::info!(%remote_addr, %error, "TLS handshake refused");
                        unidentified.charge();
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote_addr, "TLS handshake timed out");
                        unidentified.charge();
                        return;
                    }
                };
                let (identity, cert) =
                    tls::inspect(stream.get_ref().1.peer_certificates(), &trust_domain);
                // An identified peer no longer counts against its address: many members may
                // share one (a municipality's network behind one NAT address).
                let unidentified = match identity {
                    PeerIdentity::Spiffe(_) => None,
                    _ => {
                        unidentified.charge();
                        Some(unidentified)
                    }
                };
                let peer = Peer {
                    remote_addr,
                    identity,
                    cert,
                };
                let cut_off = CutOff::new(&tls, &peer);
                let _ = tx
                    .send(Ok(MtlsStream {
                        inner: stream,
                        cut_off,
                        source: sources.clone(),
                        peer,
                        _connection: connection,
                        _unidentified: unidentified,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}
