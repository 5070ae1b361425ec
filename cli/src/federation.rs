//! The whole federation in one process on one machine: the development PKI, the access policy,
//! every registered service (see [`crate::services`]) on an internal port and the gateway in
//! front. `onestop up` runs it; the tests and benchmarks start it the same way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use onestop_gateway::{GatewayConfig, GatewaySettings, Route, UpstreamConfig};
use onestop_platform::config::{
    DatabaseConfig, Limits, ServerConfig, TelemetryConfig, default_trust_domain,
};
use onestop_platform::pki::dev;
use onestop_platform::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::services::{self, Local, Service};

/// The gateway's component name: its certificate and identity.
pub const GATEWAY: &str = "gateway";
/// A demo institution's system: the State Social Insurance Agency's pensions subsystem.
pub const DEMO_INSTITUTION: &str = "demo-institution";
/// The member id of the demo institution.
pub const DEMO_INSTITUTION_MEMBER: &str = "GOV/VSAA/pensions";
/// A demo service centre's system.
pub const DEMO_CENTRE: &str = "demo-centre";
/// The member id of the demo centre.
pub const DEMO_CENTRE_MEMBER: &str = "MUN/GULBENE/kac";

/// How to start the federation.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the PKI, the policy and the SQLite databases live.
    pub data_dir: PathBuf,
    /// The gateway's external address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The services to run ([`services::all`] by default).
    pub services: Vec<Service>,
    /// Databases by service name; a service not named gets SQLite `<data dir>/<name>.db`.
    pub databases: BTreeMap<String, String>,
    /// More routes for the gateway, such as test services.
    pub extra_routes: Vec<(String, Route)>,
    /// More addresses for a service's routes (service name, `host:port`): replicas started
    /// elsewhere.
    pub replicas: Vec<(String, String)>,
    /// Limits of every server.
    pub limits: Limits,
    /// Calls a second each member may make through the gateway, and its burst.
    pub member_rate: (u32, u32),
    /// Calls a second each person may make through the gateway, and their burst.
    pub person_rate: (u32, u32),
    /// Calls each member may have in flight through the gateway at once.
    pub member_in_flight: usize,
    /// Long-lived streams open at once through the gateway, in total and per member.
    pub streams: (usize, usize),
    /// How often every server re-reads the revocation list.
    pub reload_interval: std::time::Duration,
    /// Where to serve the process's metrics, liveness and readiness, if anywhere.
    pub admin: Option<SocketAddr>,
    /// How long every server lets calls finish after a shutdown signal.
    pub drain: std::time::Duration,
    /// The longest deadline the gateway lets a call have (long-lived methods excepted).
    pub max_deadline: std::time::Duration,
}

impl Options {
    /// The defaults of `onestop up`.
    pub fn new(data_dir: &Path, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            listen,
            services: services::all(),
            databases: BTreeMap::new(),
            extra_routes: Vec::new(),
            replicas: Vec::new(),
            limits: Limits::default(),
            member_rate: (500, 1000),
            person_rate: (10, 30),
            member_in_flight: 256,
            streams: (1024, 32),
            reload_interval: std::time::Duration::from_secs(10),
            admin: None,
            drain: std::time::Duration::from_secs(10),
            max_deadline: std::time::Duration::from_secs(30),
        }
    }

    fn server_config(&self, listen: SocketAddr, name: &str) -> ServerConfig {
        let mut config = ServerConfig::new(listen, TlsFiles::in_pki_dir(&self.pki_dir(), name));
        config.limits = self.limits;
        config.reload_interval_ms = self.reload_interval;
        config.drain_timeout_ms = self.drain;
        config
    }

    fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    /// The database of a service.
    pub fn database(&self, service: &str) -> String {
        self.databases.get(service).cloned().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.data_dir.join(format!("{service}.db")).display()
            )
        })
    }
}

/// A running federation.
pub struct Federation {
    /// The gateway's bound address.
    pub gateway: SocketAddr,
    /// Each service's internal address, by name.
    pub services: BTreeMap<&'static str, SocketAddr>,
    /// The PKI directory.
    pub pki_dir: PathBuf,
    /// The admin listener's address, if there is one.
    pub admin: Option<SocketAddr>,
    /// Cancel to stop everything.
    pub shutdown: CancellationToken,
    servers: JoinSet<(&'static str, anyhow::Result<()>)>,
    /// Stops the admin listener when the federation is dropped, after its servers drained.
    _admin_stop: tokio_util::sync::DropGuard,
}

/// The policy file of a data directory, written when missing with the header and each
/// service's default rights.
pub fn ensure_policy(data_dir: &Path, services: &[Service]) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("policy.toml");
    if !path.exists() {
        let mut text = String::from(
            "# Access rights through the gateway: member (CLASS/CODE or CLASS/CODE/SUBSYSTEM) -> methods.\n\
             # Anything not allowed here is denied. See the gateway's documentation for the pattern rules.\n",
        );
        for service in services {
            text.push('\n');
            text.push_str(service.default_policy);
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// Makes the development PKI: the gateway's and every service's certificate, and the demo
/// members'.
pub fn ensure_pki(dir: &Path, services: &[Service]) -> anyhow::Result<()> {
    let components: Vec<&str> = std::iter::once(GATEWAY)
        .chain(services.iter().map(|service| service.name))
        .collect();
    dev::ensure(
        dir,
        &default_trust_domain(),
        &components,
        &[
            (DEMO_INSTITUTION, DEMO_INSTITUTION_MEMBER),
            (DEMO_CENTRE, DEMO_CENTRE_MEMBER),
        ],
    )
    .context("making the development PKI")?;
    Ok(())
}

/// Starts the federation and returns once every listener is bound.
pub async fn start(options: Options) -> anyhow::Result<Federation> {
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating {}", options.data_dir.display()))?;
    let pki_dir = options.pki_dir();
    ensure_pki(&pki_dir, &options.services)?;
    let policy = ensure_policy(&options.data_dir, &options.services)?;
    let shutdown = CancellationToken::new();
    let mut servers = JoinSet::new();
    // One admin listener for the process: every server in it reports into the same registry.
    // It outlives the shutdown's drain (stopped when the federation is dropped), so that
    // `/readyz` answers 503 while the servers drain instead of refusing connections.
    let admin_stop = CancellationToken::new();
    let admin = match options.admin {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("binding the admin listener to {address}"))?;
            let bound = listener.local_addr()?;
            tokio::spawn(onestop_platform::metrics::serve_admin(
                listener,
                admin_stop.clone(),
            ));
            Some(bound)
        }
        None => None,
    };

    let mut routes = BTreeMap::new();
    // Every listener is bound first, so that each service knows every other's address whatever
    // their order (identity asks routing, routing asks forms and the e-address).
    let mut listeners = Vec::new();
    let mut addresses = BTreeMap::new();
    for service in &options.services {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addresses.insert(service.name, listener.local_addr()?);
        listeners.push(listener);
    }
    for (service, listener) in options.services.iter().zip(listeners) {
        let address = listener.local_addr()?;
        let prepared = (service.local)(Local {
            server: options.server_config(address, service.name),
            database: DatabaseConfig::at(options.database(service.name)),
            data_dir: options.data_dir.clone(),
            peers: addresses.clone(),
        })
        .with_context(|| format!("configuring {}", service.name))?;
        // Each service opens its store before the gateway starts, so that a failure is
        // reported at once and the first call finds it ready.
        let serving = prepared
            .start(listener, shutdown.clone())
            .await
            .with_context(|| format!("starting {}", service.name))?;
        let name = service.name;
        servers.spawn(async move { (name, serving.await) });
        let mut route_addresses = vec![address.to_string()];
        route_addresses.extend(
            options
                .replicas
                .iter()
                .filter(|(of, _)| of == service.name)
                .map(|(_, address)| address.clone()),
        );
        for grpc_service in service.grpc_services {
            routes.insert(
                (*grpc_service).to_owned(),
                Route {
                    addresses: route_addresses.clone(),
                    component: service.name.to_owned(),
                },
            );
        }
    }
    for (service, route) in &options.extra_routes {
        routes.insert(service.clone(), route.clone());
    }

    let gateway_listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding the gateway to {}", options.listen))?;
    let gateway_addr = gateway_listener.local_addr()?;
    let gateway = GatewayConfig {
        server: options.server_config(gateway_addr, GATEWAY),
        upstream: UpstreamConfig {
            tls: TlsFiles::in_pki_dir(&pki_dir, GATEWAY),
            server_name: "localhost".into(),
            connections_per_address: 4,
            resolve_interval_ms: 30_000,
        },
        routes,
        gateway: GatewaySettings {
            policy,
            rate_per_second: options.member_rate.0,
            burst: options.member_rate.1,
            max_deadline_ms: u64::try_from(options.max_deadline.as_millis()).unwrap_or(u64::MAX),
            method_deadlines_ms: options
                .services
                .iter()
                .flat_map(|service| service.long_lived)
                .map(|method| ((*method).to_owned(), 0))
                .collect(),
            max_in_flight: 4096,
            max_in_flight_per_member: options.member_in_flight,
            max_streams: options.streams.0,
            max_streams_per_member: options.streams.1,
            max_connections_per_member: 64,
            connections_per_second_per_member: 10,
            person_rate_per_second: options.person_rate.0,
            person_burst: options.person_rate.1,
        },
        telemetry: TelemetryConfig::default(),
        admin: Default::default(),
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
        services: addresses,
        pki_dir,
        admin,
        shutdown,
        servers,
        _admin_stop: admin_stop.drop_guard(),
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
