//! A certificate authority for development and tests, and the certificates it issues.
//!
//! Production deployments bring their own CA; this one exists so that `onestop up` and the
//! tests run with real certificates and real mutual TLS. Keys are ECDSA P-256. A PKI directory
//! holds `ca.pem`/`ca.key` and one `<name>.pem`/`<name>.key` pair per issued certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::SpiffeId;

/// The CA's certificate revocation list in a PKI directory (PEM).
pub const CRL_FILE: &str = "ca.crl";

/// What went wrong with the PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or parsing a key or certificate failed.
    #[error("certificate error: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A name or identity is not usable in a certificate.
    #[error("{0}")]
    Invalid(String),
}

/// A certificate authority that can issue certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What to put in a new certificate.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    /// The subject's common name, for people reading the certificate.
    pub common_name: String,
    /// The SPIFFE identity in the URI SAN; `None` makes a certificate without one.
    pub identity: Option<SpiffeId>,
    /// DNS names the holder serves under (for server certificates).
    pub dns_names: Vec<String>,
    /// IP addresses the holder serves under (for server certificates).
    pub ip_addresses: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl IssueRequest {
    /// A request valid from a minute ago for `valid_for`.
    pub fn new(common_name: &str, identity: Option<SpiffeId>, valid_for: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            identity,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            not_before: now - time::Duration::minutes(1),
            // A century at most: beyond it lies arithmetic overflow, not a use.
            not_after: now + valid_for.min(Duration::from_secs(100 * 365 * 86_400)),
        }
    }

    /// Adds the names a server on this machine answers to: `localhost` and the loopback
    /// addresses.
    pub fn serving_localhost(mut self) -> Self {
        self.dns_names.push("localhost".to_owned());
        self.ip_addresses.push(IpAddr::from([127, 0, 0, 1]));
        self.ip_addresses
            .push(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]));
        self
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes `<name>.pem` and `<name>.key` (the key readable by the owner only).
    pub fn save(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        write_file(&dir.join(format!("{name}.key")), &self.key_pem, true)?;
        write_file(&dir.join(format!("{name}.pem")), &self.cert_pem, false)
    }
}

impl Ca {
    /// Makes a new CA for a trust domain, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "onestop");
        name.push(
            DnType::CommonName,
            format!("onestop development CA ({trust_domain})"),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.pem` and `ca.key` from a PKI directory.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_pem = read_file(&dir.join("ca.pem"))?;
        let key = KeyPair::from_pem(&read_file(&dir.join("ca.key"))?)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { cert_pem, issuer })
    }

    /// Writes `ca.pem` and `ca.key` into a PKI directory, creating it.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        // The key first: a directory with `ca.pem` is taken to hold a whole CA.
        write_file(
            &dir.join("ca.key"),
            &self.issuer.key().serialize_pem(),
            true,
        )?;
        write_file(&dir.join("ca.pem"), &self.cert_pem, false)
    }

    /// The CA certificate, PEM encoded: what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate usable for both client and server authentication.
    pub fn issue(&self, request: &IssueRequest) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "onestop");
        name.push(DnType::CommonName, request.common_name.as_str());
        params.distinguished_name = name;
        if let Some(identity) = &request.identity {
            let uri = identity
                .to_string()
                .try_into()
                .map_err(|_| PkiError::Invalid(format!("`{identity}` is not ASCII")))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        for dns in &request.dns_names {
            let dns = dns
                .as_str()
                .try_into()
                .map_err(|_| PkiError::Invalid(format!("`{dns}` is not a DNS name")))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        for ip in &request.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = request.not_before;
        params.not_after = request.not_after;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Ca {
    /// Adds the certificate `cert_pem` to the revocation list in `dir` and writes the list
    /// anew. Returns how many certificates the list names now.
    pub fn revoke(&self, dir: &Path, cert_pem: &str) -> Result<usize, PkiError> {
        let serial = serial_of(cert_pem)?;
        let mut revoked = revoked_in(dir)?;
        if !revoked.iter().any(|(listed, _)| *listed == serial) {
            revoked.push((serial, OffsetDateTime::now_utc()));
        }
        self.write_crl(dir, &revoked)?;
        Ok(revoked.len())
    }

    /// Writes `ca.crl` naming these serials, signed by the CA, valid for a year.
    pub fn write_crl(
        &self,
        dir: &Path,
        revoked: &[(Vec<u8>, OffsetDateTime)],
    ) -> Result<(), PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(365),
            // Later lists carry larger numbers, as RFC 5280 asks.
            crl_number: SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, when)| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: *when,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        // Written whole and renamed, so that a server reloading it never reads half a list.
        let path = dir.join(CRL_FILE);
        let partial = dir.join(format!("{CRL_FILE}.partial"));
        write_file(&partial, &crl.pem()?, false)?;
        std::fs::rename(&partial, &path).map_err(|source| PkiError::Io { path, source })
    }
}

/// A certificate serial number as compared here: big-endian bytes without leading zeros (DER
/// adds one when the top bit is set).
pub fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let first = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[first..].to_vec()
}

/// The serial number of the first certificate of a PEM file.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    Ok(normalize_serial(cert.raw_serial()))
}

/// The serials and revocation times the revocation list in `dir` names (none without a list).
pub fn revoked_in(dir: &Path) -> Result<Vec<(Vec<u8>, OffsetDateTime)>, PkiError> {
    let path = dir.join(CRL_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = read_file(&path)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("{}: not PEM: {e}", path.display())))?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents)
        .map_err(|e| PkiError::Invalid(format!("{}: not a CRL: {e}", path.display())))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|entry| {
            let when = OffsetDateTime::from_unix_timestamp(entry.revocation_date.timestamp())
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            (normalize_serial(entry.raw_serial()), when)
        })
        .collect())
}

/// A short description of a certificate file, for `onestop pki show`.
#[derive(Debug)]
pub struct CertSummary {
    /// The subject.
    pub subject: String,
    /// The URI SANs (SPIFFE identities).
    pub uris: Vec<String>,
    /// The DNS and IP SANs.
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: String,
    /// End of validity.
    pub not_after: String,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

/// An IP address of a certificate as people write it (`127.0.0.1`, `::1`); bytes of another
/// length, which no valid certificate holds, as hex.
fn ip_address(bytes: &[u8]) -> String {
    match <[u8; 4]>::try_from(bytes) {
        Ok(v4) => std::net::Ipv4Addr::from(v4).to_string(),
        Err(_) => match <[u8; 16]>::try_from(bytes) {
            Ok(v6) => std::net::Ipv6Addr::from(v6).to_string(),
            Err(_) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        },
    }
}

/// Describes the first certificate of a PEM file.
pub fn summarize(pem: &str) -> Result<CertSummary, PkiError> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let mut uris = Vec::new();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::IPAddress(ip) => names.push(ip_address(ip)),
                _ => {}
            }
        }
    }
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        uris,
        names,
        not_before: cert.validity().not_before.to_string(),
        not_after: cert.validity().not_after.to_string(),
        is_ca: cert.is_ca(),
    })
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file; a secret one is created readable by the owner only from the start.
fn write_file(path: &Path, content: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut file| {
            file.write_all(content.as_bytes())
                .and_then(|()| file.sync_all())
        })
        .map_err(io)
}

/// A development PKI: the CA and the certificates a one-machine federation needs. Which
/// components and members those are is the caller's to say.
pub mod dev {
    use std::path::Path;
    use std::time::Duration;

    use super::{Ca, IssueRequest, PkiError};
    use crate::identity::{Member, SpiffeId};

    /// Makes the development CA and its (empty) revocation list unless the directory has them,
    /// and every certificate that is missing: one per platform component (`<name>.pem`, identity
    /// `spiffe://<domain>/platform/<name>`, serving localhost), and one per member system
    /// (`(file name, CLASS/CODE/SUBSYSTEM)`). Returns whether anything was made.
    pub fn ensure(
        dir: &Path,
        trust_domain: &str,
        components: &[&str],
        members: &[(&str, &str)],
    ) -> Result<bool, PkiError> {
        let ca = if dir.join("ca.pem").exists() {
            Ca::load(dir)?
        } else {
            let ca = Ca::generate(trust_domain)?;
            ca.save(dir)?;
            ca
        };
        if !dir.join(super::CRL_FILE).exists() {
            // An empty list, so that every server watches it from the start and a later
            // `onestop pki revoke` takes effect without a restart.
            ca.write_crl(dir, &[])?;
        }
        let year = Duration::from_secs(365 * 24 * 3600);
        let mut made = false;
        let mut issue = |name: &str, request: IssueRequest| -> Result<(), PkiError> {
            if !dir.join(format!("{name}.pem")).exists() {
                ca.issue(&request)?.save(dir, name)?;
                made = true;
            }
            Ok(())
        };
        for component in components {
            let identity = SpiffeId::platform(trust_domain, component);
            issue(
                component,
                IssueRequest::new(component, Some(identity), year).serving_localhost(),
            )?;
        }
        for (name, member) in members {
            let member = Member::parse(member).map_err(|e| PkiError::Invalid(e.to_string()))?;
            let identity = SpiffeId::member(trust_domain, member);
            issue(name, IssueRequest::new(name, Some(identity), year))?;
        }
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_addresses_read_as_addresses() {
        assert_eq!(super::ip_address(&[127, 0, 0, 1]), "127.0.0.1");
        assert_eq!(
            super::ip_address(&std::net::Ipv6Addr::LOCALHOST.octets()),
            "::1"
        );
        assert_eq!(super::ip_address(&[1, 2]), "0102");
    }
}
