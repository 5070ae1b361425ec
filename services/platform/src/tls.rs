//! Mutual TLS: rustls configurations for servers and clients, certificate revocation lists that
//! are reloaded while running, and the caller's SPIFFE identity read from the peer certificate
//! once per connection. The accept loop that admits connections is in [`crate::accept`].
//!
//! Only TLS 1.3 and 1.2 are offered (rustls has nothing older) with the `ring` provider, the one
//! crypto provider in the build. Certificates are checked against the configured CA alone: no
//! system roots are ever trusted. Servers never resume sessions: a resumed session would skip the
//! certificate checks (expiry, revocation) that a full handshake makes, and gRPC connections are
//! long-lived, so the saving would be small.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::identity::SpiffeId;
use crate::reload::Reloading;

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

/// Where a process finds its CA, certificate, key and revocation list (PEM files).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This process's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
    /// The CA's certificate revocation list (PEM, `X509 CRL`); a peer certificate listed there
    /// is refused. Re-read while running when it changes.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The files `<dir>/ca.pem`, `<dir>/<name>.pem`, `<dir>/<name>.key` and, when it exists,
    /// `<dir>/ca.crl` of a PKI directory.
    pub fn in_pki_dir(dir: &Path, name: &str) -> Self {
        let crl = dir.join(crate::pki::CRL_FILE);
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            crl: crl.exists().then_some(crl),
        }
    }
}

/// The parsed trust anchors, certificate chain, key and revocation lists of one process.
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .field("crls", &self.crls.len())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

impl TlsMaterial {
    /// Reads and parses the files.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut material =
            Self::from_pem(&read(&files.ca)?, &read(&files.cert)?, &read(&files.key)?).map_err(
                |error| match error {
                    TlsError::Pem(why) => TlsError::Pem(format!("{}: {why}", files.cert.display())),
                    other => other,
                },
            )?;
        if let Some(crl) = &files.crl {
            material.crls = parse_crls(&read(crl)?)
                .map_err(|why| TlsError::Pem(format!("{}: {why}", crl.display())))?;
        }
        Ok(material)
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
            crls: Vec::new(),
        })
    }

    /// This process's certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots.add(ca.clone())?;
        }
        Ok(Arc::new(roots))
    }

    /// The serial numbers (raw DER bytes) the revocation lists name.
    fn revoked_serials(&self) -> HashSet<Vec<u8>> {
        self.crls
            .iter()
            .filter_map(|crl| x509_parser::parse_x509_crl(crl).ok())
            .flat_map(|(_, crl)| {
                crl.iter_revoked_certificates()
                    .map(|revoked| crate::pki::normalize_serial(revoked.raw_serial()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The labels of a certificate the process serves with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    /// `server` (the process's own certificate) or `ca` (the CA its peers must chain to).
    certificate: String,
    /// The file it was read from, as configured.
    file: String,
}

/// `onestop_tls_certificate_expiry_timestamp_seconds{certificate, file}`: when each certificate
/// a server loaded stops being valid (Unix time). A timestamp rather than a countdown, so that
/// it is exact between reloads: the days left are `(metric - time()) / 86400`.
fn certificate_expiry() -> &'static Family<CertificateLabels, Gauge> {
    static EXPIRY: OnceLock<Family<CertificateLabels, Gauge>> = OnceLock::new();
    EXPIRY.get_or_init(|| {
        let family = Family::default();
        crate::metrics::register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the server's own certificate (certificate=server) and its CA (certificate=ca) expire, Unix time",
            family.clone(),
        );
        family
    })
}

/// The earliest end of validity among `certs`, Unix seconds.
fn earliest_not_after(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|cert| x509_parser::parse_x509_certificate(cert).ok())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .min()
}

impl TlsMaterial {
    /// Publishes when the server certificate (the chain's leaf) and the CA expire, under the
    /// files they came from.
    fn publish_expiry(&self, files: &TlsFiles) {
        let leaf = earliest_not_after(&self.chain[..self.chain.len().min(1)]);
        for (certificate, file, not_after) in [
            ("server", &files.cert, leaf),
            ("ca", &files.ca, earliest_not_after(&self.ca)),
        ] {
            if let Some(not_after) = not_after {
                certificate_expiry()
                    .get_or_create(&CertificateLabels {
                        certificate: certificate.to_owned(),
                        file: file.display().to_string(),
                    })
                    .set(not_after);
            }
        }
    }
}

fn parse_crls(pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("revocation list: {e}"))?;
    // An empty file would silently revoke nothing: a list must be there, even if it is empty.
    if crls.is_empty() {
        return Err("no X509 CRL found".into());
    }
    for crl in &crls {
        x509_parser::parse_x509_crl(crl).map_err(|e| format!("revocation list: {e}"))?;
    }
    Ok(crls)
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

/// A server configuration for gRPC (ALPN `h2`) that verifies client certificates against the CA
/// and its revocation lists, and never resumes a session.
pub fn server_config(
    material: &TlsMaterial,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(material.roots()?, provider.clone())
        .with_crls(material.crls.iter().cloned());
    let verifier = match client_auth {
        ClientAuth::Required => verifier.build()?,
        ClientAuth::Optional => verifier.allow_unauthenticated().build()?,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption, neither by session id (TLS 1.2) nor by ticket (1.3): every connection
    // shows a certificate that is checked now.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration for gRPC (ALPN `h2`) that presents this process's certificate and
/// trusts only the CA. With `server_identity`, the server's certificate must also name exactly
/// that SPIFFE identity: a certificate of another component of the same CA is refused before
/// anything is sent to it.
pub fn client_config(
    material: &TlsMaterial,
    server_identity: Option<&SpiffeId>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let webpki = WebPkiServerVerifier::builder_with_provider(material.roots()?, provider)
        .with_crls(material.crls.iter().cloned())
        .build()
        .map_err(|e| TlsError::Pem(format!("server verifier: {e}")))?;
    let builder = match server_identity {
        None => builder.with_webpki_verifier(webpki),
        Some(identity) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                webpki,
                expected: identity.clone(),
            })),
    };
    let mut config =
        builder.with_client_auth_cert(material.chain.clone(), material.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Checks a server's certificate as WebPKI does (chain, validity, name, revocation), and then
/// that it names the one SPIFFE identity expected of that server.
#[derive(Debug)]
struct SpiffeServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let (identity, _) = inspect(
            Some(std::slice::from_ref(end_entity)),
            &self.expected.trust_domain,
        );
        match identity {
            PeerIdentity::Spiffe(id) if *id == self.expected => Ok(verified),
            other => {
                tracing::warn!(expected = %self.expected, found = ?other, "upstream certificate names another identity");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A server's TLS configuration that follows its revocation list: the file is checked every
/// `reload_interval` and, when it changed, a new configuration is built for the connections
/// that come next, the serials it lists are refused on connections already open, and
/// [`ServerTls::changes`] tells the connections and streams to look at their certificates again.
#[derive(Debug)]
pub struct ServerTls {
    loaded: Arc<Reloading<Loaded, TlsError>>,
}

struct Loaded {
    config: Arc<ServerConfig>,
    revoked: HashSet<Vec<u8>>,
}

impl ServerTls {
    /// Loads the files and builds the first configuration.
    pub fn load(files: &TlsFiles, client_auth: ClientAuth) -> Result<Arc<Self>, TlsError> {
        let owned = files.clone();
        let loaded = Reloading::new("revocation list", files.crl.clone(), move || {
            let material = TlsMaterial::load(&owned)?;
            // Every reload reads the certificates again too: a renewed one shows at once.
            material.publish_expiry(&owned);
            Ok(Loaded {
                config: server_config(&material, client_auth)?,
                revoked: material.revoked_serials(),
            })
        })?;
        Ok(Arc::new(Self {
            loaded: Arc::new(loaded),
        }))
    }

    /// The configuration for a new connection.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.loaded.current().config.clone()
    }

    /// Whether the certificate with this serial ([`crate::pki::normalize_serial`]) is revoked.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.loaded.current().revoked.contains(serial)
    }

    /// Rebuilds the configuration if the revocation list changed; returns whether it did. A
    /// list that cannot be read or parsed leaves the previous configuration in force.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.loaded.reload_if_changed()
    }

    /// Wakes on every reload of the revocation list.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.loaded.changes()
    }

    /// Checks the revocation list for changes every `interval` until `shutdown`.
    pub fn watch(&self, interval: Duration, shutdown: CancellationToken) {
        self.loaded.watch(interval, shutdown);
    }
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

/// The facts of a peer's certificate that matter after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// The serial number, as [`crate::pki::normalize_serial`] gives it.
    pub serial: Vec<u8>,
    /// The end of its validity.
    pub not_after: SystemTime,
}

impl PeerCert {
    /// Why the certificate may not be used now (expired, or revoked per `tls`), if it may not.
    pub fn unusable(&self, tls: &ServerTls) -> Option<&'static str> {
        if SystemTime::now() > self.not_after {
            Some("the client certificate has expired")
        } else if tls.is_revoked(&self.serial) {
            Some("the client certificate has been revoked")
        } else {
            None
        }
    }
}

/// The peer of one connection, as every request on it sees it (inserted into the request's
/// extensions by tonic).
#[derive(Clone, Debug)]
pub struct Peer {
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// The identity from its certificate.
    pub identity: PeerIdentity,
    /// Its certificate, when it presented one.
    pub cert: Option<Arc<PeerCert>>,
}

/// The identity and the certificate facts of a verified leaf certificate. Exactly one
/// `spiffe://` URI of the expected trust domain is accepted: a certificate naming two identities
/// names none.
pub fn inspect(
    certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> (PeerIdentity, Option<Arc<PeerCert>>) {
    use x509_parser::extensions::GeneralName;
    let Some(leaf) = certs.and_then(|certs| certs.first()) else {
        return (PeerIdentity::Anonymous, None);
    };
    let unidentified = |why: String| PeerIdentity::Unidentified(why.into());
    let cert = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => cert,
        Err(e) => {
            return (
                unidentified(format!("the certificate cannot be parsed: {e}")),
                None,
            );
        }
    };
    let facts = Arc::new(PeerCert {
        serial: crate::pki::normalize_serial(cert.raw_serial()),
        not_after: SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0),
            ),
    });
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
    let identity = match uris.as_slice() {
        [] => unidentified("the certificate carries no spiffe:// identity".into()),
        [uri] => match SpiffeId::parse(uri) {
            Ok(id) if id.trust_domain == trust_domain => PeerIdentity::Spiffe(Arc::new(id)),
            Ok(id) => unidentified(format!(
                "the certificate's identity {id} is not of trust domain {trust_domain}"
            )),
            Err(e) => unidentified(format!("the certificate's identity is malformed: {e}")),
        },
        _ => unidentified("the certificate carries more than one spiffe:// identity".into()),
    };
    (identity, Some(facts))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki::{self, Ca, IssueRequest};

    #[test]
    fn the_expiry_of_the_server_certificate_and_ca_is_published_and_follows_a_reload() {
        crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("onestop.lv").unwrap();
        ca.save(dir.path()).unwrap();
        ca.write_crl(dir.path(), &[]).unwrap();
        let id = SpiffeId::parse("spiffe://onestop.lv/platform/forms").unwrap();
        let issue = |valid_for: u64| {
            ca.issue(
                &IssueRequest::new("forms", Some(id.clone()), Duration::from_secs(valid_for))
                    .serving_localhost(),
            )
            .unwrap()
            .save(dir.path(), "forms")
            .unwrap();
        };
        issue(3600);
        let files = TlsFiles::in_pki_dir(dir.path(), "forms");
        let tls = ServerTls::load(&files, ClientAuth::Required).unwrap();
        let expiry = |certificate: &str, file: &Path| {
            certificate_expiry()
                .get_or_create(&CertificateLabels {
                    certificate: certificate.into(),
                    file: file.display().to_string(),
                })
                .get()
        };
        let now = i64::try_from(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let server = expiry("server", &files.cert);
        assert!((now + 3500..=now + 3700).contains(&server), "{server}");
        assert!(
            expiry("ca", &files.ca) > now + 365 * 86_400,
            "the CA lasts years"
        );

        // A renewed certificate is read at the next reload.
        issue(30 * 86_400);
        // The revocation list is what triggers a reload; one more entry changes its size.
        ca.write_crl(dir.path(), &[(vec![7], time::OffsetDateTime::now_utc())])
            .unwrap();
        assert!(tls.reload_if_changed().unwrap());
        let renewed = expiry("server", &files.cert);
        assert!(renewed > now + 29 * 86_400, "{renewed}");
    }

    #[test]
    fn a_revoked_certificate_is_known_after_a_reload() {
        crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("onestop.lv").unwrap();
        ca.save(dir.path()).unwrap();
        ca.write_crl(dir.path(), &[]).unwrap();
        let id = SpiffeId::parse("spiffe://onestop.lv/platform/forms").unwrap();
        let server = IssueRequest::new("forms", Some(id), Duration::from_secs(3600));
        ca.issue(&server.serving_localhost())
            .unwrap()
            .save(dir.path(), "forms")
            .unwrap();
        let member = SpiffeId::parse("spiffe://onestop.lv/member/GOV/VSAA/pensions").unwrap();
        let issued = ca
            .issue(&IssueRequest::new(
                "m",
                Some(member),
                Duration::from_secs(3600),
            ))
            .unwrap();
        issued.save(dir.path(), "m").unwrap();

        let tls = ServerTls::load(
            &TlsFiles::in_pki_dir(dir.path(), "forms"),
            ClientAuth::Required,
        )
        .unwrap();
        let serial = pki::serial_of(&issued.cert_pem).unwrap();
        assert!(!tls.is_revoked(&serial));
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed yet");

        assert_eq!(ca.revoke(dir.path(), &issued.cert_pem).unwrap(), 1);
        assert_eq!(
            ca.revoke(dir.path(), &issued.cert_pem).unwrap(),
            1,
            "listed once"
        );
        assert!(tls.reload_if_changed().unwrap());
        assert!(tls.is_revoked(&serial));

        // A list that cannot be parsed leaves the previous one in force.
        std::fs::write(dir.path().join(pki::CRL_FILE), "garbage").unwrap();
        assert!(tls.reload_if_changed().is_err());
        assert!(tls.is_revoked(&serial));
    }
}
