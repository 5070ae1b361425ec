//! Calling a gRPC server over mutual TLS: a tonic `Channel` (one multiplexed HTTP/2
//! connection, remade when lost) whose connections are made with this process's own rustls
//! configuration rather than tonic's, so that there is one TLS setup for servers and clients.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

/// The HTTP/2 flow-control window of one call, in bytes.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// The HTTP/2 flow-control window of one connection, in bytes.
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

/// A lazily connecting channel to another platform component at `address`, as this process's
/// own component (its `[server.tls]` certificate): the server must present `component`'s
/// certificate (`spiffe://<domain>/platform/<component>`, for `server_name`). What one service
/// uses to call another directly (routing → forms, routing → e-address, identity → routing).
pub fn to_component(
    server: &crate::config::ServerConfig,
    address: &str,
    server_name: &str,
    component: &str,
) -> Result<Channel, ClientError> {
    let material =
        crate::tls::TlsMaterial::load(&server.tls).map_err(|e| ClientError(e.to_string()))?;
    let identity = crate::identity::SpiffeId::platform(&server.trust_domain, component);
    let config = crate::tls::client_config(&material, Some(&identity))
        .map_err(|e| ClientError(e.to_string()))?;
    channel(address, server_name, config, Duration::from_secs(30))
}

/// A lazily connecting channel to `address` (`host:port`), checking the server's certificate
/// against `server_name`.
pub fn channel(
    address: &str,
    server_name: &str,
    tls: Arc<ClientConfig>,
    keepalive: Duration,
) -> Result<Channel, ClientError> {
    let server_name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ClientError(format!("server name `{server_name}`: {e}")))?;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| ClientError(format!("address `{address}`: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        // Fixed windows: adaptive sizing sends a ping with every burst of data, which costs more
        // than it brings for many small messages on a local network.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .tcp_nodelay(true);
    let connector = TlsConnector::from(tls);
    let target = address.to_owned();
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            Ok::<_, std::io::Error>(TokioIo::new(dial(&target, server_name, &connector).await?))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// Opens one mutual-TLS connection to `address`, within five seconds.
pub async fn dial(
    address: &str,
    server_name: ServerName<'static>,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let connect = async {
        let tcp = TcpStream::connect(address).await?;
        // gRPC is many small messages; Nagle's algorithm would delay each.
        tcp.set_nodelay(true)?;
        connector.connect(server_name, tcp).await
    };
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {address} timed out"),
            )
        })?
}
