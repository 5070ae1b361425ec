//! The services behind the gateway: one multiplexed HTTP/2 connection per service over internal
//! mutual TLS, used directly (no queue or worker task between a call and the connection) and
//! remade when it is lost; and a watcher that mirrors each service's health into the gateway's
//! own health service.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use onestop_platform::client;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// Why an upstream is unusable.
#[derive(Debug, thiserror::Error)]
#[error("upstream {service} at {address}: {message}")]
pub struct UpstreamError {
    service: String,
    address: String,
    message: String,
}

/// Why one call could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The connection failed during the call.
    #[error("connection failed: {0}")]
    Http(#[from] hyper::Error),
}

/// One service behind the gateway.
pub struct Upstream {
    /// The gRPC service name, such as `onestop.forms.v1.FormsService`.
    pub service: String,
    /// Its address, `host:port`.
    pub address: String,
    authority: http::uri::Authority,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    keepalive: Duration,
    /// The live connection's handle; cloning it is cheap.
    current: Mutex<Option<SendRequest<Body>>>,
    /// Held while a connection is being made, so that a burst of calls makes one, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl Upstream {
    /// Prepares the connection to a service; it is made on first use and remade when lost.
    pub fn new(
        service: &str,
        address: &str,
        server_name: &str,
        tls: Arc<ClientConfig>,
        keepalive: Duration,
    ) -> Result<Self, UpstreamError> {
        let server_name =
            ServerName::try_from(server_name.to_owned()).map_err(|e| UpstreamError {
                service: service.to_owned(),
                address: address.to_owned(),
                message: format!("server name `{server_name}`: {e}"),
            })?;
        let authority = address.parse().map_err(|e| UpstreamError {
            service: service.to_owned(),
            address: address.to_owned(),
            message: format!("not a host:port address: {e}"),
        })?;
        Ok(Self {
            service: service.to_owned(),
            address: address.to_owned(),
            authority,
            server_name,
            tls: TlsConnector::from(tls),
            keepalive,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Sends one call and returns the response as soon as its headers arrive; the body follows
    /// frame by frame.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let mut sender = self.sender().await.map_err(SendError::Connect)?;
        Ok(sender.send_request(request).await?)
    }

    /// The request's path on this upstream: HTTP/2 needs a scheme and an authority.
    pub fn uri_for(&self, uri: &http::Uri) -> http::Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        http::Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }

    fn live(&self) -> Option<SendRequest<Body>> {
        let current = self.current.lock().ok()?;
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> std::io::Result<SendRequest<Body>> {
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some(sender) = self.live() {
            return Ok(sender);
        }
        let sender = self.connect().await?;
        if let Ok(mut current) = self.current.lock() {
            *current = Some(sender.clone());
        }
        Ok(sender)
    }

    async fn connect(&self) -> std::io::Result<SendRequest<Body>> {
        let tls = client::dial(&self.address, self.server_name.clone(), &self.tls).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(client::STREAM_WINDOW)
            .initial_connection_window_size(client::CONNECTION_WINDOW)
            .keep_alive_interval(self.keepalive)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        let service = self.service.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::info!(%service, %error, "upstream connection closed");
            }
        });
        Ok(sender)
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

/// The upstream as a tonic transport, for the gateway's own calls to it (health).
#[derive(Clone)]
struct Client(Arc<Upstream>);

impl tower::Service<Request<Body>> for Client {
    type Response = Response<Incoming>;
    type Error = SendError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, SendError>> + Send>>;

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
