//! Application routing: the service catalogue, durable submission with provenance, institution
//! inboxes with at-least-once streaming delivery, status back to the applicant, and the
//! service-case statistics municipalities are paid on.
//!
//! Layout, each layer calling only downward: [`api`] (tonic handlers, the contract's messages)
//! → [`service`] (use cases and who may do what) and [`inbox`] (consumer streams, leases,
//! wake-ups) → [`catalogue`] (services, centres, routes: the domain) and [`forms`] (validation
//! by the forms service) → [`store`] (sqlx). [`error`] is where errors become gRPC statuses;
//! [`model`] holds the domain's records.

pub mod api;
pub mod catalogue;
pub mod decisions;
pub mod error;
pub mod forms;
pub mod inbox;
pub mod model;
pub mod service;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use onestop_platform::config::{AdminConfig, DatabaseConfig, ServerConfig, TelemetryConfig};
use onestop_platform::identity::Member;
use onestop_platform::requests::Requests;
use onestop_platform::server::Services;
use onestop_proto::routing::v1::application_service_server::ApplicationServiceServer;
use onestop_proto::routing::v1::catalogue_service_server::CatalogueServiceServer;
use onestop_proto::routing::v1::inbox_service_server::InboxServiceServer;
use onestop_proto::routing::v1::service_case_service_server::ServiceCaseServiceServer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::service::Routing;

/// The configuration of one routing process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Listener, TLS and limits.
    pub server: ServerConfig,
    /// The routing database.
    pub database: DatabaseConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Metrics, liveness and readiness.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Service settings.
    pub routing: RoutingSettings,
}

/// The `[routing]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSettings {
    /// Where the forms service listens (`host:port`); submissions are validated there over
    /// mutual TLS with this process's own certificate.
    pub forms_address: String,
    /// The name the forms service's certificate must carry.
    #[serde(default = "default_server_name")]
    pub forms_server_name: String,
    /// A catalogue file (TOML) whose entries are put into the store at every start, replacing
    /// entries with the same ids. Without it, the built-in catalogue seeds an empty store.
    #[serde(default)]
    pub catalogue: Option<PathBuf>,
    /// Institutions (`CLASS/CODE`) whose systems may change the catalogue, release any parked
    /// delivery and read every centre's statistics.
    #[serde(default = "default_operators")]
    pub operators: Vec<String>,
    /// How long a delivery is leased to a consumer before it is delivered again, seconds.
    #[serde(default = "default_lease")]
    pub lease_s: u64,
    /// Deliveries of one application before it is parked.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Where the e-address service listens (`host:port`): decisions are sent to applicants'
    /// e-addresses there. Without it, decisions wait in the outbox.
    #[serde(default)]
    pub eaddress_address: Option<String>,
    /// The name the e-address service's certificate must carry.
    #[serde(default = "default_server_name")]
    pub eaddress_server_name: String,
}

fn default_server_name() -> String {
    "localhost".to_owned()
}
fn default_operators() -> Vec<String> {
    vec!["GOV/VDAA".to_owned()]
}
fn default_lease() -> u64 {
    60
}
fn default_max_attempts() -> u32 {
    5
}

impl RoutingSettings {
    /// The settings with every default, validating through the forms service at `forms_address`.
    pub fn new(forms_address: impl Into<String>) -> Self {
        Self {
            forms_address: forms_address.into(),
            forms_server_name: default_server_name(),
            catalogue: None,
            operators: default_operators(),
            lease_s: default_lease(),
            max_attempts: default_max_attempts(),
            eaddress_address: None,
            eaddress_server_name: default_server_name(),
        }
    }
}

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The database could not be opened.
    #[error(transparent)]
    Database(#[from] onestop_platform::db::DbError),
    /// The store failed at start.
    #[error(transparent)]
    Store(#[from] onestop_platform::db::StoreError),
    /// The catalogue could not be loaded.
    #[error("catalogue: {0}")]
    Catalogue(String),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] onestop_platform::server::ServeError),
}

/// Opens the store, loads the catalogue and connects to the forms service.
pub async fn open(config: &RoutingConfig) -> Result<Arc<Routing>, ServeError> {
    let settings = &config.routing;
    if settings.lease_s == 0 || settings.lease_s > 3600 {
        return Err(ServeError::Config(
            "routing.lease_s must be 1-3600 seconds".into(),
        ));
    }
    if settings.max_attempts == 0 || settings.max_attempts > 100 {
        return Err(ServeError::Config(
            "routing.max_attempts must be 1-100".into(),
        ));
    }
    let operators = settings
        .operators
        .iter()
        .map(|op| {
            Member::parse(op).map_err(|e| ServeError::Config(format!("routing.operators: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let forms = forms::Forms::connect(&config.server, settings)
        .map_err(|e| ServeError::Config(format!("routing.forms_address: {e}")))?;
    let db = onestop_platform::db::open(&config.database, &store::MIGRATIONS).await?;
    let requests = Requests::new(&db, config.database.request_retention());
    let store = store::Store::new(db);
    let loaded = match &settings.catalogue {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ServeError::Catalogue(format!("{}: {e}", path.display())))?;
            Some(
                catalogue::CatalogueFile::parse(&text)
                    .map_err(|e| ServeError::Catalogue(format!("{}: {e}", path.display())))?,
            )
        }
        None => None,
    };
    let routing = Routing::open(
        store,
        requests,
        forms,
        operators,
        service::Leases {
            lease: Duration::from_secs(settings.lease_s),
            max_attempts: settings.max_attempts,
        },
        loaded,
    )
    .await
    .map_err(|e| ServeError::Catalogue(e.to_string()))?;
    Ok(Arc::new(routing))
}

/// Serves the routing contract until `shutdown` is cancelled.
pub async fn serve(
    config: &RoutingConfig,
    routing: Arc<Routing>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tokio::spawn(routing.requests().clone().keep_pruned(shutdown.clone()));
    tokio::spawn(keep_catalogue_fresh(routing.clone(), shutdown.clone()));
    tokio::spawn(keep_figures(routing.clone(), shutdown.clone()));
    match &config.routing.eaddress_address {
        Some(address) => {
            let eaddress = decisions::EaddressClient::connect(
                &config.server,
                address,
                &config.routing.eaddress_server_name,
            )
            .map_err(|e| ServeError::Config(format!("routing.eaddress_address: {e}")))?;
            tokio::spawn(decisions::keep_draining(
                routing.store().clone(),
                eaddress,
                routing.decided().clone(),
                shutdown.clone(),
            ));
        }
        None => tracing::warn!(
            "routing.eaddress_address is not set: decisions are kept in the outbox, not sent"
        ),
    }
    if routing.store().database().backend == onestop_platform::db::Backend::Postgres {
        routing.inboxes().follow_postgres(
            config.database.url.clone(),
            store::INBOX_CHANNEL,
            shutdown.clone(),
        );
    }
    let mut services = Services::new(&config.server);
    services
        .health()
        .follow_database(routing.store().database().clone(), shutdown.clone());
    let api = api::RoutingApi::new(routing, shutdown.clone());
    services
        .add(CatalogueServiceServer::new(api.clone()))
        .add(ApplicationServiceServer::new(api.clone()))
        .add(InboxServiceServer::new(api.clone()))
        .add(ServiceCaseServiceServer::new(api));
    onestop_platform::server::serve(&config.server, services, listener, shutdown).await?;
    Ok(())
}

/// How often the inboxes' gauges are counted from the database: one aggregate query over the
/// unacknowledged deliveries, however often `/metrics` is scraped.
pub const FIGURES_REFRESH: Duration = Duration::from_secs(10);

/// Counts the inboxes' figures every [`FIGURES_REFRESH`] until `shutdown`.
async fn keep_figures(routing: Arc<Routing>, shutdown: CancellationToken) {
    let figures = inbox::figures();
    loop {
        match routing.store().inbox_figures().await {
            Ok(counted) => figures.show(&inbox::shown(
                &routing.catalogue(),
                &counted,
                onestop_platform::clock::now(),
            )),
            Err(error) => tracing::warn!(%error, "counting the inboxes failed; tried again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FIGURES_REFRESH) => {}
        }
    }
}

/// How often a replica reads the catalogue again, for changes made through another replica.
const CATALOGUE_RELOAD: Duration = Duration::from_secs(30);

/// Reads the catalogue again every [`CATALOGUE_RELOAD`] until `shutdown`: an operator's change
/// reaches the replica that made it at once and the others within that time.
async fn keep_catalogue_fresh(routing: Arc<Routing>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CATALOGUE_RELOAD) => {}
        }
        if let Err(error) = routing.reload_catalogue().await {
            tracing::warn!(%error, "reading the catalogue again failed; the last one stays");
        }
    }
}
