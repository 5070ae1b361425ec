//! The whole federation in one process on one machine: the development PKI, the access policy,
//! every implemented service on an internal port and the gateway in front. `onestop up` runs it;
//! the tests and benchmarks start it the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use onestop_forms::{FormsConfig, FormsSettings};
use onestop_gateway::{GatewayConfig, GatewaySettings, Route, UpstreamConfig};
use onestop_platform::config::{
    DatabaseConfig, Limits, ServerConfig, TelemetryConfig, default_trust_domain,
};
use onestop_platform::pki::dev;
use onestop_platform::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The e-forms service's gRPC name.
pub const FORMS_SERVICE: &str = onestop_proto::forms::v1::forms_service_server::SERVICE_NAME;

/// How to start the federation.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the PKI, the policy and the SQLite databases live.
    pub data_dir: PathBuf,
    /// The gateway's external address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The forms database; `None` means SQLite in the data directory.
    pub forms_database: Option<String>,
    /// More routes for the gateway, such as test services.
    pub extra_routes: Vec<(String, Route)>,
    /// More addresses in the gateway's forms route: replicas started elsewhere.
    pub forms_replicas: Vec<String>,
    /// Limits of every server.
    pub limits: Limits,
    /// Calls a second each member may make through the gateway, and its burst.
    pub member_rate: (u32, u32),
    /// Calls each member may have in flight through the gateway at once.
    pub member_in_flight: usize,
    /// Long-lived streams open at once through the gateway, in total and per member.
    pub streams: (usize, usize),
    /// How often every server re-reads the revocation list.
    pub reload_interval: std::time::Duration,
}

impl Options {
    /// The defaults of `onestop up`.
    pub fn new(data_dir: &Path, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            listen,
            forms_database: None,
            extra_routes: Vec::new(),
            forms_replicas: Vec::new(),
            limits: Limits::default(),
            member_rate: (500, 1000),
            member_in_flight: 256,
            streams: (1024, 32),
            reload_interval: std::time::Duration::from_secs(10),
        }
    }
}

/// A running federation.
pub struct Federation {
    /// The gateway's bound address.
    pub gateway: SocketAddr,
    /// The forms service's internal address.
    pub forms: SocketAddr,
    /// The forms service's database.
    pub forms_database: String,
    /// The PKI directory.
    pub pki_dir: PathBuf,
    /// Cancel to stop everything.
    pub shutdown: CancellationToken,
    servers: JoinSet<(&'static str, anyhow::Result<()>)>,
}

/// The access policy written on first start: the demo institution manages and uses forms, the
/// demo centre reads forms and validates applications.
const DEFAULT_POLICY: &str = r#"# Access rights through the gateway: member (CLASS/CODE or CLASS/CODE/SUBSYSTEM) -> methods.
# Anything not allowed here is denied. See the gateway's documentation for the pattern rules.

[[allow]]
member = "GOV/VSAA"
methods = ["onestop.forms.v1.FormsService/*"]

[[allow]]
member = "MUN/GULBENE/kac"
methods = [
  "onestop.forms.v1.FormsService/Get*",
  "onestop.forms.v1.FormsService/List*",
  "onestop.forms.v1.FormsService/ValidateFormData",
]
"#;

/// The policy file of a data directory, written with the defaults when missing.
pub fn ensure_policy(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("policy.toml");
    if !path.exists() {
        std::fs::write(&path, DEFAULT_POLICY)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

fn server_config(options: &Options, listen: SocketAddr, name: &str) -> ServerConfig {
    let mut config = ServerConfig::new(
        listen,
        TlsFiles::in_pki_dir(&options.data_dir.join("pki"), name),
    );
    config.limits = options.limits;
    config.reload_interval_ms = options.reload_interval;
    config
}

/// Starts the federation and returns once every listener is bound.
pub async fn start(options: Options) -> anyhow::Result<Federation> {
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    let pki_dir = options.data_dir.join("pki");
    dev::ensure(&pki_dir, &default_trust_domain()).context("making the development PKI")?;
    let policy = ensure_policy(&options.data_dir)?;
    let shutdown = CancellationToken::new();
    let mut servers = JoinSet::new();

    let forms_listener = TcpListener::bind("127.0.0.1:0").await?;
    let forms_addr = forms_listener.local_addr()?;
    let forms_database = options
        .forms_database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", options.data_dir.join("forms.db").display()));
    let forms = FormsConfig {
        server: server_config(&options, forms_addr, dev::FORMS),
        database: DatabaseConfig {
            url: forms_database.clone(),
            max_connections: 8,
        },
        telemetry: TelemetryConfig::default(),
        forms: FormsSettings::default(),
    };
    // Open the store (and seed it) before the gateway starts, so that a failure is reported
    // at once and the first call finds the forms.
    let registry = onestop_forms::open_registry(&forms).await?;
    {
        let shutdown = shutdown.clone();
        servers.spawn(async move {
            let result =
                onestop_forms::serve_registry(&forms, registry, forms_listener, shutdown).await;
            ("forms", result.map_err(anyhow::Error::from))
        });
    }

    let gateway_listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding the gateway to {}", options.listen))?;
    let gateway_addr = gateway_listener.local_addr()?;
    let mut routes = std::collections::BTreeMap::new();
    routes.insert(
        FORMS_SERVICE.to_owned(),
        Route {
            addresses: std::iter::once(forms_addr.to_string())
                .chain(options.forms_replicas.iter().cloned())
                .collect(),
            component: dev::FORMS.to_owned(),
        },
    );
    for (service, route) in &options.extra_routes {
        routes.insert(service.clone(), route.clone());
    }
    let gateway = GatewayConfig {
        server: server_config(&options, gateway_addr, dev::GATEWAY),
        upstream: UpstreamConfig {
            tls: TlsFiles::in_pki_dir(&pki_dir, dev::GATEWAY),
            server_name: "localhost".into(),
            connections_per_address: 4,
            resolve_interval_ms: 30_000,
        },
        routes,
        gateway: GatewaySettings {
            policy,
            rate_per_second: options.member_rate.0,
            burst: options.member_rate.1,
            max_deadline_ms: 30_000,
            max_in_flight: 4096,
            max_in_flight_per_member: options.member_in_flight,
            max_streams: options.streams.0,
            max_streams_per_member: options.streams.1,
            max_connections_per_member: 64,
        },
        telemetry: TelemetryConfig::default(),
    };
    {
        let shutdown = shutdown.clone();
        servers.spawn(async move {
            let result = onestop_gateway::serve(&gateway, gateway_listener, shutdown).await;
            ("gateway", result.map_err(anyhow::Error::from))
        });
    }
    Ok(Federation {
        gateway: gateway_addr,
        forms: forms_addr,
        forms_database,
        pki_dir,
        shutdown,
        servers,
    })
}

impl Federation {
    /// Stops every server and waits for them to drain; the first failure is returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until every server has stopped: after a shutdown, or because one failed, which
    /// stops the others too (half a federation helps no one). The first failure is returned.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(joined) = self.servers.join_next().await {
            let (name, result) = joined.unwrap_or_else(|e| ("server", Err(anyhow::anyhow!("{e}"))));
            if let Err(error) = result {
                tracing::error!(server = name, error = %format!("{error:#}"), "server failed");
                first_error.get_or_insert(error.context(format!("{name} failed")));
                self.shutdown.cancel();
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
