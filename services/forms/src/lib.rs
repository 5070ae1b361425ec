//! The e-forms service: versioned e-form definitions (JSON Schema, draft 2020-12, with labels in
//! Latvian and English and display hints) and validation of application data against them, with
//! one precise field violation per problem.
//!
//! Layout, each layer calling only downward: [`api`] (tonic handlers) → [`registry`] (use cases
//! and who may do what) → [`schema`], [`compat`], [`formats`] and [`model`] (the domain) →
//! [`store`] (sqlx). [`error`] is where domain errors become gRPC statuses; [`seed`] holds the
//! five forms every installation starts with.

pub mod api;
pub mod compat;
pub mod error;
pub mod formats;
pub mod model;
pub mod registry;
pub mod schema;
pub mod seed;
pub mod store;

use std::sync::Arc;

use onestop_platform::config::{AdminConfig, DatabaseConfig, ServerConfig, TelemetryConfig};
use onestop_platform::identity::Member;
use onestop_platform::requests::Requests;
use onestop_platform::server::Services;
use onestop_proto::forms::v1::forms_service_server::FormsServiceServer;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// The configuration of one e-forms process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormsConfig {
    /// Listener, TLS and limits.
    pub server: ServerConfig,
    /// The forms database.
    pub database: DatabaseConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Metrics, liveness and readiness.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Service settings.
    #[serde(default)]
    pub forms: FormsSettings,
}

/// The `[forms]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FormsSettings {
    /// Institutions (`CLASS/CODE`) whose systems may manage every form.
    pub operators: Vec<String>,
    /// Create the seed forms that do not exist yet at start.
    pub seed: bool,
}

impl Default for FormsSettings {
    fn default() -> Self {
        Self {
            operators: vec!["GOV/VDAA".to_owned()],
            seed: true,
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
    /// The registry could not be opened over its store.
    #[error("opening the forms registry: {0}")]
    Registry(#[source] error::FormsError),
    /// A seed form could not be created.
    #[error("seed form {form}: {error}")]
    Seed {
        /// The form.
        form: String,
        /// Why.
        error: String,
    },
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] onestop_platform::server::ServeError),
}

/// Opens the store and builds the registry (seeding it when configured).
pub async fn open_registry(config: &FormsConfig) -> Result<Arc<Registry>, ServeError> {
    let operators = config
        .forms
        .operators
        .iter()
        .map(|op| {
            Member::parse(op).map_err(|e| ServeError::Config(format!("forms.operators: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let db = onestop_platform::db::open(&config.database, &store::MIGRATIONS).await?;
    let requests = Requests::new(&db, config.database.request_retention());
    let registry = Arc::new(
        Registry::open(store::Store::new(db), requests, operators)
            .await
            .map_err(ServeError::Registry)?,
    );
    if config.forms.seed {
        let forms = seed::seed_forms().map_err(|e| ServeError::Seed {
            form: "(parse)".into(),
            error: e.to_string(),
        })?;
        for form in forms {
            let id = form.form_id.clone();
            registry
                .seed(&config.server.trust_domain, form, OffsetDateTime::now_utc())
                .await
                .map_err(|e| ServeError::Seed {
                    form: id,
                    error: e.to_string(),
                })?;
        }
    }
    Ok(registry)
}

/// Runs the e-forms service on a bound listener until `shutdown` is cancelled.
pub async fn serve(
    config: &FormsConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let registry = open_registry(config).await?;
    serve_registry(config, registry, listener, shutdown).await
}

/// Serves an opened registry on a bound listener until `shutdown` is cancelled.
pub async fn serve_registry(
    config: &FormsConfig,
    registry: Arc<Registry>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tokio::spawn(registry.requests().clone().keep_pruned(shutdown.clone()));
    let mut services = Services::new(&config.server);
    // Not serving while the database does not answer.
    services
        .health()
        .follow_database(registry.database().clone(), shutdown.clone());
    services.add(FormsServiceServer::new(api::FormsApi::new(registry)));
    onestop_platform::server::serve(&config.server, services, listener, shutdown).await?;
    Ok(())
}
