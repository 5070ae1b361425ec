//! Every platform service the binary runs, each described once: its name, the gRPC services it
//! serves, the access rights a one-machine installation gives the demo members, and how to run
//! it from a configuration file or on one machine. `onestop serve <name>`, `onestop up`, the
//! development PKI, the default access policy, the gateway's routes in `up` and the tests'
//! federation all go through [`all`].
//!
//! Adding a service is a new crate plus one [`Service`] value in [`all`]: see
//! `docs/adding-a-service.md`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;

use onestop_forms::{FormsConfig, FormsSettings};
use onestop_platform::config::{self, DatabaseConfig, ServerConfig, TelemetryConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A server that runs until its shutdown token is cancelled.
pub type Serving = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Opening what a server needs (its store, its seed data); it fails here, before anything is
/// served, or yields the server, ready to run.
pub type Starting = Pin<Box<dyn Future<Output = anyhow::Result<Serving>> + Send>>;

/// What a service gets on one machine (`onestop up`, the tests).
pub struct Local {
    /// Its listener's address, TLS files (its component's certificate) and limits.
    pub server: ServerConfig,
    /// Its own database.
    pub database: DatabaseConfig,
}

/// A service whose configuration has been read and checked, ready to start.
pub struct Prepared {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its logs and traces.
    pub telemetry: TelemetryConfig,
    /// Where its admin listener (metrics, liveness, readiness) listens, if anywhere.
    pub admin: Option<SocketAddr>,
    start: Box<dyn FnOnce(TcpListener, CancellationToken) -> Starting + Send>,
}

impl Prepared {
    /// Wraps a service's configuration and its start.
    pub fn new(
        listen: SocketAddr,
        telemetry: TelemetryConfig,
        start: impl FnOnce(TcpListener, CancellationToken) -> Starting + Send + 'static,
    ) -> Self {
        Self {
            listen,
            telemetry,
            admin: None,
            start: Box::new(start),
        }
    }

    /// With an admin listener on `admin`.
    pub fn with_admin(mut self, admin: Option<SocketAddr>) -> Self {
        self.admin = admin;
        self
    }

    /// Opens what the service needs and returns it ready to serve on `listener`.
    pub fn start(self, listener: TcpListener, shutdown: CancellationToken) -> Starting {
        (self.start)(listener, shutdown)
    }
}

/// A platform service as the binary knows it.
#[derive(Clone, Copy)]
pub struct Service {
    /// Its component name: `onestop serve <name>`, its certificate's identity
    /// `spiffe://<domain>/platform/<name>`, its database file `<name>.db` on one machine.
    pub name: &'static str,
    /// The gRPC services it serves; the gateway routes them to it.
    pub grpc_services: &'static [&'static str],
    /// `[[allow]]` entries of the access policy `onestop up` writes: what the demo members may
    /// call.
    pub default_policy: &'static str,
    /// Reads its configuration file (with environment overrides).
    pub from_file: fn(&Path, &HashMap<String, String>) -> anyhow::Result<Prepared>,
    /// Its configuration on one machine.
    pub local: fn(Local) -> Prepared,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("grpc_services", &self.grpc_services)
            .finish_non_exhaustive()
    }
}

/// Every service of the platform, in the order `onestop up` starts them.
pub fn all() -> Vec<Service> {
    vec![FORMS]
}

/// The service of that name.
pub fn find(name: &str) -> Option<Service> {
    all().into_iter().find(|service| service.name == name)
}

/// The e-forms service.
pub const FORMS: Service = Service {
    name: "forms",
    grpc_services: &[onestop_proto::forms::v1::forms_service_server::SERVICE_NAME],
    default_policy: r#"# The demo institution manages and uses forms; the demo centre reads them and validates
# applications.
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
"#,
    from_file: |path, env| Ok(forms(config::load(Some(path), env)?)),
    local: |local| {
        forms(FormsConfig {
            server: local.server,
            database: local.database,
            telemetry: TelemetryConfig::default(),
            admin: Default::default(),
            forms: FormsSettings::default(),
        })
    },
};

fn forms(config: FormsConfig) -> Prepared {
    let admin = config.admin.listen;
    Prepared::new(
        config.server.listen,
        config.telemetry.clone(),
        |listener, shutdown| {
            Box::pin(async move {
                // The store is opened (and seeded) before anything is served, so that a failure
                // is reported at once and the first call finds the forms.
                let registry = onestop_forms::open_registry(&config).await?;
                let serving: Serving = Box::pin(async move {
                    onestop_forms::serve_registry(&config, registry, listener, shutdown).await?;
                    Ok(())
                });
                Ok(serving)
            })
        },
    )
    .with_admin(admin)
}
