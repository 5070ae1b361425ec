//! The test harness: the whole federation started for real on ephemeral ports with real
//! certificates, against SQLite or a throwaway PostgreSQL, plus clients that connect the way a
//! member's system does. The tests themselves are in `tests/it/`, one module per area.

pub mod attack;
pub mod echo;
pub mod oidc;
pub mod pg;
pub mod relay;
pub mod smtp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use onestop_cli::federation::{self, Federation, Options};
use onestop_gateway::Route;
use onestop_platform::identity::SpiffeId;
use onestop_platform::pki::{Ca, IssueRequest};
use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use tonic::transport::Channel;

/// A service the gateway routes to a port where nothing listens.
pub const UNREACHABLE_SERVICE: &str = "onestop.testing.v1.UnreachableService";

/// Which database the services use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite files in the federation's data directory.
    Sqlite,
    /// A throwaway PostgreSQL server.
    Postgres,
}

/// An empty database for one test, on SQLite or a throwaway PostgreSQL, gone when dropped.
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
    _postgres: Option<pg::Postgres>,
    _dir: tempfile::TempDir,
}

impl TestDatabase {
    /// A new database on `backend`.
    pub async fn start(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.path().join("test.db").display()),
                _postgres: None,
                _dir: dir,
            },
            Backend::Postgres => {
                let postgres = tokio::task::spawn_blocking(pg::Postgres::start)
                    .await
                    .expect("PostgreSQL start")
                    .expect("a throwaway PostgreSQL");
                Self {
                    url: postgres.database("test").await.expect("a database"),
                    _postgres: Some(postgres),
                    _dir: dir,
                }
            }
        }
    }
}

/// A federation running for one test.
pub struct TestFederation {
    fed: Option<Federation>,
    /// The gateway's address.
    pub gateway: std::net::SocketAddr,
    /// The forms service's internal address.
    pub forms: std::net::SocketAddr,
    /// The echo service's internal address.
    pub echo: std::net::SocketAddr,
    /// The PKI directory: `ca.pem`, and `<name>.pem`/`<name>.key` per certificate.
    pub pki: PathBuf,
    /// The forms service's database.
    pub forms_database: String,
    /// Every service's database, by service name.
    pub databases: std::collections::BTreeMap<String, String>,
    /// The federation's data directory (PKI, policy, SQLite files, identity's keys).
    pub data_dir: PathBuf,
    /// The admin listener, when the test asked for one.
    pub admin: Option<std::net::SocketAddr>,
    _nowhere: tokio::net::TcpSocket,
    postgres: Option<pg::Postgres>,
    _dir: tempfile::TempDir,
}

impl TestFederation {
    /// Starts the federation (and the echo service behind the gateway) on `backend`.
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts the federation with options changed by `adjust`.
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Options)) -> Self {
        onestop_platform::telemetry::init_for_tests();
        tls::crypto_provider();
        let dir = tempfile::tempdir().expect("temporary directory");
        let postgres = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                tokio::task::spawn_blocking(pg::Postgres::start)
                    .await
                    .expect("PostgreSQL start")
                    .expect("a throwaway PostgreSQL"),
            ),
        };
        let mut options = Options::new(dir.path(), "127.0.0.1:0".parse().expect("address"));
        // The echo service joins through its registration, like any service.
        options.services.push(echo::REGISTRATION);
        if let Some(pg) = &postgres {
            // Each service its own database, as in production.
            for service in &options.services {
                let url = pg.database(service.name).await.expect("a database");
                options.databases.insert(service.name.into(), url);
            }
        }
        // A route to a port held but never listened on, to see an upstream that is down.
        let nowhere = tokio::net::TcpSocket::new_v4().expect("socket");
        nowhere
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("a free port");
        options.extra_routes.push((
            UNREACHABLE_SERVICE.to_owned(),
            Route {
                addresses: vec![nowhere.local_addr().expect("address").to_string()],
                component: "nowhere".into(),
            },
        ));
        adjust(&mut options);
        // The demo institution may call every test service.
        let policy = federation::ensure_policy(dir.path(), &options.services).expect("policy");
        let mut text = std::fs::read_to_string(&policy).expect("policy");
        text.push_str(
            "\n[[allow]]\nmember = \"GOV/VSAA\"\nmethods = [\"onestop.testing.v1.*\"]\n\n\
             [[allow]]\nmember = \"GOV/NVA\"\nmethods = [\"onestop.forms.v1.FormsService/*\"]\n",
        );
        std::fs::write(&policy, text).expect("policy");
        let forms_database = options.database("forms");
        let databases = options
            .services
            .iter()
            .map(|s| (s.name.to_owned(), options.database(s.name)))
            .collect();
        let data_dir = options.data_dir.clone();
        let fed = federation::start(options).await.expect("federation starts");
        Self {
            gateway: fed.gateway,
            forms: fed.services["forms"],
            echo: fed.services["echo"],
            pki: fed.pki_dir.clone(),
            forms_database,
            databases,
            data_dir,
            admin: fed.admin,
            fed: Some(fed),
            _nowhere: nowhere,
            postgres,
            _dir: dir,
        }
    }

    /// Stops the PostgreSQL server the services use (fast shutdown), as when its host fails.
    pub fn stop_database(&mut self) {
        self.postgres.take();
    }

    /// Starts another replica of the forms service on the same database, stopped when
    /// `shutdown` is cancelled; returns its address.
    pub async fn start_forms_replica(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let address = listener.local_addr().expect("address");
        let config = onestop_forms::FormsConfig {
            server: onestop_platform::config::ServerConfig::new(
                address,
                TlsFiles::in_pki_dir(&self.pki, "forms"),
            ),
            database: onestop_platform::config::DatabaseConfig::at(&self.forms_database),
            telemetry: Default::default(),
            admin: Default::default(),
            forms: onestop_forms::FormsSettings {
                seed: false,
                ..Default::default()
            },
        };
        tokio::spawn(async move {
            if let Err(error) = onestop_forms::serve(&config, listener, shutdown).await {
                tracing::error!(%error, "forms replica failed");
            }
        });
        address
    }

    /// A channel to the gateway authenticated with certificate `name` of the PKI directory.
    pub fn gateway_client(&self, name: &str) -> Channel {
        mtls_channel(&self.gateway.to_string(), &self.pki, name)
    }

    /// A channel straight to the forms service, bypassing the gateway.
    pub fn forms_client(&self, name: &str) -> Channel {
        mtls_channel(&self.forms.to_string(), &self.pki, name)
    }

    /// Issues a certificate from the federation's CA.
    pub fn issue(&self, name: &str, request: &IssueRequest) {
        let ca = Ca::load(&self.pki).expect("CA");
        ca.issue(request)
            .expect("issue")
            .save(&self.pki, name)
            .expect("save");
    }

    /// Issues a member certificate valid for a day.
    pub fn issue_member(&self, name: &str, member: &str) {
        let member = onestop_platform::identity::Member::parse(member).expect("member");
        let identity = SpiffeId::member("onestop.lv", member);
        self.issue(
            name,
            &IssueRequest::new(name, Some(identity), Duration::from_secs(86_400)),
        );
    }

    /// Stops every server and checks that they stopped cleanly.
    pub async fn stop(mut self) {
        if let Some(fed) = self.fed.take() {
            fed.stop().await.expect("the federation stops cleanly");
        }
    }
}

impl Drop for TestFederation {
    fn drop(&mut self) {
        if let Some(fed) = &self.fed {
            fed.shutdown.cancel();
        }
    }
}

/// A channel to `address` authenticated with certificate `name` of a PKI directory.
pub fn mtls_channel(address: &str, pki: &Path, name: &str) -> Channel {
    let material = TlsMaterial::load(&TlsFiles::in_pki_dir(pki, name)).expect("certificate");
    let config = tls::client_config(&material, None).expect("client TLS");
    onestop_platform::client::channel(address, "localhost", config, Duration::from_secs(30))
        .expect("channel")
}

/// A channel that trusts the CA of `pki` but presents no certificate.
pub fn anonymous_channel(address: &str, pki: &Path) -> Channel {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.join("ca.pem")).expect("CA");
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.expect("CA certificate")).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    onestop_platform::client::channel(
        address,
        "localhost",
        Arc::new(config),
        Duration::from_secs(30),
    )
    .expect("channel")
}

/// Connects to `address` trusting the CA of `trusted_pki` and presenting certificate `name` of
/// `cert_pki`, and returns how the server ended the session: the TLS alert it sent when it
/// refused the certificate. Panics if the server accepted it.
pub async fn tls_refusal(address: &str, trusted_pki: &Path, cert_pki: &Path, name: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = std::fs::read(trusted_pki.join("ca.pem")).expect("CA");
    let cert = std::fs::read(cert_pki.join(format!("{name}.pem"))).expect("certificate");
    let key = std::fs::read(cert_pki.join(format!("{name}.key"))).expect("key");
    let material = TlsMaterial::from_pem(&ca, &cert, &key).expect("TLS material");
    let config = tls::client_config(&material, None).expect("client TLS");
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("TCP connection");
    let server = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    // With TLS 1.3 the client finishes first; the server's verdict on the client certificate
    // arrives as an alert on the first read.
    let mut stream = match tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await
    {
        Ok(stream) => stream,
        Err(error) => return error.to_string(),
    };
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buffer = [0u8; 1024];
    match stream.read(&mut buffer).await {
        Err(error) => error.to_string(),
        Ok(0) => "closed without an alert".to_owned(),
        // The server talks HTTP/2 only after accepting the certificate.
        Ok(_) => panic!("the server accepted certificate {name}"),
    }
}

/// `GET path` on a plain HTTP listener (the admin listener): the status code and the body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("admin listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// The value of one sample in Prometheus text (`name{labels} value`), 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (with the health service's own `Watch`, no polling) until `service` is SERVING.
pub async fn await_serving(channel: Channel, service: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut updates = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let serving = async {
        while let Some(update) = updates.message().await.expect("health update") {
            if update.status() == ServingStatus::Serving {
                return;
            }
        }
        panic!("the health stream ended before {service} was serving");
    };
    tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .unwrap_or_else(|_| panic!("{service} was not serving within 30 s"));
}
