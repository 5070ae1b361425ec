//! Mutual TLS: rustls configurations for servers and clients, the accept loop that turns TCP
//! connections into authenticated TLS streams, and the caller's SPIFFE identity read from the
//! peer certificate once per connection.
//!
//! Only TLS 1.3 and 1.2 are offered (rustls has nothing older) with the `ring` provider, the one
//! crypto provider in the build. Certificates are checked against the configured CA alone: no
//! system roots are ever trusted.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::identity::SpiffeId;

/// What went wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no usable PEM object.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Where a process finds its CA, certificate and key (PEM files).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This process's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `<dir>/ca.pem`, `<dir>/<name>.pem` and `<dir>/<name>.key` of a PKI directory.
    pub fn in_pki_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// The parsed trust anchors, certificate chain and key of one process.
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TlsMaterial {
    /// Reads and parses the three files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Io {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(&read(&files.ca)?, &read(&files.cert)?, &read(&files.key)?).map_err(
            |error| match error {
                TlsError::Pem(why) => TlsError::Pem(format!("{}: {why}", files.cert.display())),
                other => other,
            },
        )
    }

    /// Parses PEM text.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let certs = |pem: &[u8], what: &str| {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Pem(format!("{what}: {e}")))?;
            if certs.is_empty() {
                return Err(TlsError::Pem(format!("{what}: no certificate found")));
            }
            Ok(certs)
        };
        Ok(Self {
            ca: certs(ca, "CA certificate")?,
            chain: certs(cert, "certificate")?,
            key: PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| TlsError::Pem(format!("private key: {e}")))?,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone())?;
        }
        Ok(Arc::new(roots))
    }
}

/// Whether a server demands a client certificate during the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate, no connection: internal listeners.
    Required,
    /// A connection without a certificate is allowed so that the caller can be told, in a gRPC
    /// status, that one is needed; a certificate that is presented must still be valid.
    Optional,
}

/// The process-wide crypto provider, installed on first use.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    if let Some(provider) = CryptoProvider::get_default() {
        return provider.clone();
    }
    // Losing a race with another thread installing the same provider is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A server configuration for gRPC (ALPN `h2`) that verifies client certificates against the CA.
pub fn server_config(
    material: &TlsMaterial,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(material.roots()?, provider.clone());
    let verifier = match client_auth {
        ClientAuth::Required => verifier.build()?,
        ClientAuth::Optional => verifier.allow_unauthenticated().build()?,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration for gRPC (ALPN `h2`) that presents this process's certificate and
/// trusts only the CA.
pub fn client_config(material: &TlsMaterial) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(material.roots()?)
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What the peer's certificate says about who it is.
#[derive(Clone, Debug)]
pub enum PeerIdentity {
    /// No certificate was presented.
    Anonymous,
    /// A valid certificate without a usable identity of this trust domain; the text says why.
    Unidentified(Arc<str>),
    /// A valid certificate naming this SPIFFE identity.
    Spiffe(Arc<SpiffeId>),
}

/// The peer of one connection, as every request on it sees it (inserted into the request's
/// extensions by tonic).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// The identity from its certificate.
    pub identity: PeerIdentity,
}

/// Reads the SPIFFE identity from a verified leaf certificate. Exactly one `spiffe://` URI of
/// the expected trust domain is accepted: a certificate naming two identities names none.
pub fn identity_of(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> PeerIdentity {
    use x509_parser::extensions::GeneralName;
    let Some(leaf) = certs.and_then(|certs| certs.first()) else {
        return PeerIdentity::Anonymous;
    };
    let unidentified = |why: String| PeerIdentity::Unidentified(why.into());
    let cert = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => cert,
        Err(e) => return unidentified(format!("the certificate cannot be parsed: {e}")),
    };
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    match uris.as_slice() {
        [] => unidentified("the certificate carries no spiffe:// identity".into()),
        [uri] => match SpiffeId::parse(uri) {
            Ok(id) if id.trust_domain == trust_domain => PeerIdentity::Spiffe(Arc::new(id)),
            Ok(id) => unidentified(format!(
                "the certificate's identity {id} is not of trust domain {trust_domain}"
            )),
            Err(e) => unidentified(format!("the certificate's identity is malformed: {e}")),
        },
        _ => unidentified("the certificate carries more than one spiffe:// identity".into()),
    }
}

/// A TLS connection whose peer has been authenticated, with the identity read once.
pub struct MtlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl MtlsStream {
    /// The peer of this connection.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl AsyncRead for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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

/// Limits of the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// At most this many handshakes run at once; further connections wait in the kernel's
    /// backlog.
    pub max_pending_handshakes: usize,
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding authenticated
/// streams until `shutdown` is cancelled. A failed handshake (unknown CA, expired certificate,
/// no TLS at all) is logged and dropped; it never stops the loop.
pub fn accept(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    trust_domain: String,
    limits: AcceptLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<MtlsStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(limits.max_pending_handshakes.max(1));
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        limits.max_pending_handshakes.max(1),
    ));
    let trust_domain: Arc<str> = trust_domain.into();
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (tcp, remote_addr) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // gRPC is many small messages; Nagle's algorithm would add delay to each.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                let tls = match handshake.await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::info!(%remote_addr, %error, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
                drop(permit);
                let identity = identity_of(tls.get_ref().1.peer_certificates(), &trust_domain);
                let peer = Peer {
                    remote_addr,
                    identity,
                };
                let _ = tx.send(Ok(MtlsStream { inner: tls, peer })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
