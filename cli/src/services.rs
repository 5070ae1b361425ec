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

use onestop_eaddress::{EaddressConfig, EaddressSettings};
use onestop_forms::{FormsConfig, FormsSettings};
use onestop_identity::{IdentityConfig, IdentitySettings};
use onestop_platform::config::{self, DatabaseConfig, ServerConfig, TelemetryConfig};
use onestop_routing::{RoutingConfig, RoutingSettings};
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
    /// The federation's data directory, for what the service keeps in files (its own
    /// settings file `<name>.toml`, keys).
    pub data_dir: std::path::PathBuf,
    /// The internal addresses of the services started before it, by name: those it calls.
    pub peers: std::collections::BTreeMap<&'static str, SocketAddr>,
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
    /// Methods (`package.Service/Method`) meant to stay open as long as the caller wants, which
    /// the gateway exempts from its deadline cap.
    pub long_lived: &'static [&'static str],
    /// `[[allow]]` entries of the access policy `onestop up` writes: what the demo members may
    /// call.
    pub default_policy: &'static str,
    /// Reads its configuration file (with environment overrides).
    pub from_file: fn(&Path, &HashMap<String, String>) -> anyhow::Result<Prepared>,
    /// Its configuration on one machine.
    pub local: fn(Local) -> anyhow::Result<Prepared>,
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
    vec![FORMS, IDENTITY, EADDRESS, ROUTING]
}

/// The service of that name.
pub fn find(name: &str) -> Option<Service> {
    all().into_iter().find(|service| service.name == name)
}

/// The e-forms service.
pub const FORMS: Service = Service {
    name: "forms",
    grpc_services: &[onestop_proto::forms::v1::forms_service_server::SERVICE_NAME],
    long_lived: &[],
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
        Ok(forms(FormsConfig {
            server: local.server,
            database: local.database,
            telemetry: TelemetryConfig::default(),
            admin: Default::default(),
            forms: FormsSettings::default(),
        }))
    },
};

/// The identity service.
pub const IDENTITY: Service = Service {
    name: "identity",
    grpc_services: &[onestop_proto::identity::v1::identity_service_server::SERVICE_NAME],
    long_lived: &[],
    default_policy: r#"# Front ends log people in and use their tokens: the demo centre's desk application and the
# demo institution's system.
[[allow]]
member = "MUN/GULBENE/kac"
methods = ["onestop.identity.v1.IdentityService/*"]

[[allow]]
member = "GOV/VSAA"
methods = ["onestop.identity.v1.IdentityService/*"]

# Mandates are handled by people: a clerk (or the resident) logged in at level substantial.
[[require_person]]
methods = [
  "onestop.identity.v1.IdentityService/RegisterMandate",
  "onestop.identity.v1.IdentityService/GetMandate",
  "onestop.identity.v1.IdentityService/ListMandates",
  "onestop.identity.v1.IdentityService/RevokeMandate",
  "onestop.identity.v1.IdentityService/ExchangeMandate",
]
min_level = "substantial"
"#,
    from_file: |path, env| Ok(identity(config::load(Some(path), env)?)),
    local: |local| {
        let mut settings = identity_local_settings(&local.data_dir)?;
        let routing = local.peers.get(ROUTING.name).ok_or_else(|| {
            anyhow::anyhow!("identity checks mandates against routing's catalogue: start routing")
        })?;
        settings.catalogue_address = routing.to_string();
        Ok(identity(IdentityConfig {
            server: local.server,
            database: local.database,
            telemetry: TelemetryConfig::default(),
            admin: Default::default(),
            identity: settings,
        }))
    },
};

/// The e-address service.
pub const EADDRESS: Service = Service {
    name: "eaddress",
    grpc_services: &[
        onestop_proto::eaddress::v1::mailbox_service_server::SERVICE_NAME,
        onestop_proto::eaddress::v1::message_service_server::SERVICE_NAME,
        onestop_proto::eaddress::v1::evidence_service_server::SERVICE_NAME,
    ],
    long_lived: &[
        "onestop.eaddress.v1.MessageService/UploadAttachment",
        "onestop.eaddress.v1.MessageService/DownloadAttachment",
        "onestop.eaddress.v1.MessageService/StreamIncomingMessages",
    ],
    default_policy: r#"# The demo institution sends official messages, reads its own mailbox and the evidence; the
# front ends (the demo centre's desk and the demo institution's portal) let residents with a
# token read and answer their own mailboxes.
[[allow]]
member = "GOV/VSAA"
methods = [
  "onestop.eaddress.v1.MailboxService/*",
  "onestop.eaddress.v1.MessageService/*",
  "onestop.eaddress.v1.EvidenceService/*",
]

[[allow]]
member = "MUN/GULBENE/kac"
methods = [
  "onestop.eaddress.v1.MailboxService/*",
  "onestop.eaddress.v1.MessageService/*",
  "onestop.eaddress.v1.EvidenceService/*",
]
"#,
    from_file: |path, env| Ok(eaddress(config::load(Some(path), env)?)),
    local: |local| {
        let mut server = local.server;
        // An upload is one call that lasts as long as its content takes to arrive (a gigabyte
        // over a slow line); the gateway's own per-method deadlines still bound other calls.
        server.limits.request_timeout_ms = std::time::Duration::from_secs(3600);
        Ok(eaddress(EaddressConfig {
            server,
            database: local.database,
            telemetry: TelemetryConfig::default(),
            admin: Default::default(),
            eaddress: eaddress_local_settings(&local.data_dir)?,
        }))
    },
};

/// The settings file the e-address reads on one machine, written with the development defaults
/// on the first start.
pub const EADDRESS_LOCAL_FILE: &str = "eaddress.toml";

const EADDRESS_LOCAL_DEFAULT: &str = r#"# The e-address service on one machine (`onestop up`): the [eaddress] section of its
# configuration, read at every start. Relative paths are relative to this directory. See
# docs/eaddress.md for every key.

attachments_dir = "eaddress/attachments"
# The evidence signing key: made on the first start here (development only).
evidence_key_dir = "eaddress/evidence-keys"
generate_evidence_key = true
# Latvia's rule: deemed delivered on the second working day after placement.
default_delivery_rule = "working-days:2"

# Content-free e-mail notices of new messages, through an SMTP server such as a local
# MailHog or Postfix:
# [smtp]
# host = "127.0.0.1"
# port = 1025
# tls = "none"
"#;

/// Reads `<data dir>/eaddress.toml`, writing the development default first when it is missing.
fn eaddress_local_settings(data_dir: &Path) -> anyhow::Result<EaddressSettings> {
    let file = data_dir.join(EADDRESS_LOCAL_FILE);
    if !file.exists() {
        std::fs::write(&file, EADDRESS_LOCAL_DEFAULT)?;
    }
    let text = std::fs::read_to_string(&file)?;
    let mut settings: EaddressSettings =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for path in [
        &mut settings.attachments_dir,
        &mut settings.evidence_key_dir,
    ] {
        if path.is_relative() {
            *path = data_dir.join(&*path);
        }
    }
    Ok(settings)
}

fn eaddress(config: EaddressConfig) -> Prepared {
    let admin = config.admin.listen;
    Prepared::new(
        config.server.listen,
        config.telemetry.clone(),
        |listener, shutdown| {
            Box::pin(async move {
                let eaddress = onestop_eaddress::open(&config).await?;
                let serving: Serving = Box::pin(async move {
                    onestop_eaddress::serve(&config, eaddress, listener, shutdown).await?;
                    Ok(())
                });
                Ok(serving)
            })
        },
    )
    .with_admin(admin)
}

/// The routing service.
pub const ROUTING: Service = Service {
    name: "routing",
    grpc_services: &[
        onestop_proto::routing::v1::catalogue_service_server::SERVICE_NAME,
        onestop_proto::routing::v1::application_service_server::SERVICE_NAME,
        onestop_proto::routing::v1::inbox_service_server::SERVICE_NAME,
        onestop_proto::routing::v1::service_case_service_server::SERVICE_NAME,
    ],
    long_lived: &["onestop.routing.v1.InboxService/StreamInbox"],
    default_policy: r#"# Everyone reads the catalogue. The demo centre files applications (for residents who log in
# at its desk application, at the desk, or under a mandate), reads them and registers service
# cases; the demo institution consumes its inbox and moves its applications' status. A
# municipality reads its centres' statistics.
[[allow]]
member = "MUN/GULBENE/kac"
methods = [
  "onestop.routing.v1.CatalogueService/GetCatalogue",
  "onestop.routing.v1.ApplicationService/*",
  "onestop.routing.v1.ServiceCaseService/*",
]

[[allow]]
member = "GOV/VSAA"
methods = [
  "onestop.routing.v1.CatalogueService/GetCatalogue",
  "onestop.routing.v1.ApplicationService/*",
  "onestop.routing.v1.InboxService/*",
]
"#,
    from_file: |path, env| Ok(routing(config::load(Some(path), env)?)),
    local: |local| {
        let forms = local.peers.get(FORMS.name).ok_or_else(|| {
            anyhow::anyhow!("routing validates through forms, which is not running")
        })?;
        Ok(routing(RoutingConfig {
            server: local.server,
            database: local.database,
            telemetry: TelemetryConfig::default(),
            admin: Default::default(),
            routing: RoutingSettings {
                eaddress_address: local.peers.get(EADDRESS.name).map(ToString::to_string),
                ..RoutingSettings::new(forms.to_string())
            },
        }))
    },
};

fn routing(config: RoutingConfig) -> Prepared {
    let admin = config.admin.listen;
    Prepared::new(
        config.server.listen,
        config.telemetry.clone(),
        |listener, shutdown| {
            Box::pin(async move {
                let routing = onestop_routing::open(&config).await?;
                let serving: Serving = Box::pin(async move {
                    onestop_routing::serve(&config, routing, listener, shutdown).await?;
                    Ok(())
                });
                Ok(serving)
            })
        },
    )
    .with_admin(admin)
}

/// The settings file identity reads on one machine, written with the development defaults on
/// the first start: the development OpenID providers of `scripts/dev-oidc` and the demo
/// members as front ends.
pub const IDENTITY_LOCAL_FILE: &str = "identity.toml";

/// The client secret of the development providers (not a secret: development only).
const DEV_OIDC_SECRET: &str = "dev-secret-0123456789abcdef0123";

/// What [`IDENTITY_LOCAL_FILE`] holds when the first start writes it.
pub const IDENTITY_LOCAL_DEFAULT: &str = r#"# The identity service on one machine (`onestop up`): the [identity] section of its
# configuration, read at every start. Relative paths are relative to this directory. See
# docs/identity.md for every key and for pointing it at a real eID broker or a municipality's
# staff provider.
#
# The two providers below are the development OpenID providers that `scripts/dev-oidc` runs
# on 127.0.0.1:4000 (residents) and 127.0.0.1:4001 (staff). Logins fail with
# PROVIDER_UNAVAILABLE while they are not running; everything else works without them.

key_dir = "identity-keys"

[[providers]]
id = "dev-residents"
issuer = "http://127.0.0.1:4000"
client_id = "onestop-identity"
client_secret_file = "dev-oidc-secret"
scopes = ["identity"]
audience = "residents"
[providers.acr]
"urn:onestop:loa:low" = "low"
"urn:onestop:loa:substantial" = "substantial"
"urn:onestop:loa:high" = "high"

[[providers]]
id = "dev-staff"
issuer = "http://127.0.0.1:4001"
client_id = "onestop-identity"
client_secret_file = "dev-oidc-secret"
scopes = ["staff"]
audience = "staff"
institutions = ["MUN/GULBENE", "MUN/RUGAJI", "GOV/VSAA"]
[providers.acr]
"urn:onestop:loa:low" = "low"
"urn:onestop:loa:substantial" = "substantial"
"urn:onestop:loa:high" = "high"

# The demo centre's desk application and the demo institution's system.
[[front_ends]]
member = "MUN/GULBENE/kac"
redirect_uris = ["https://desk.test/callback"]

[[front_ends]]
member = "GOV/VSAA/pensions"
redirect_uris = ["https://portal.test/callback"]
"#;

/// Reads `<data dir>/identity.toml`, writing the development default first when it is missing.
fn identity_local_settings(data_dir: &Path) -> anyhow::Result<IdentitySettings> {
    let file = data_dir.join(IDENTITY_LOCAL_FILE);
    if !file.exists() {
        std::fs::write(&file, IDENTITY_LOCAL_DEFAULT)?;
        let secret = data_dir.join("dev-oidc-secret");
        if !secret.exists() {
            std::fs::write(&secret, DEV_OIDC_SECRET)?;
        }
    }
    let text = std::fs::read_to_string(&file)?;
    let mut settings: IdentitySettings =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let relative = |path: &mut std::path::PathBuf| {
        if path.is_relative() {
            *path = data_dir.join(&*path);
        }
    };
    relative(&mut settings.key_dir);
    for provider in &mut settings.providers {
        relative(&mut provider.client_secret_file);
    }
    Ok(settings)
}

fn identity(config: IdentityConfig) -> Prepared {
    let admin = config.admin.listen;
    Prepared::new(
        config.server.listen,
        config.telemetry.clone(),
        |listener, shutdown| {
            Box::pin(async move {
                let (identity, keys) = onestop_identity::open(&config).await?;
                let serving: Serving = Box::pin(async move {
                    onestop_identity::serve(&config, identity, keys, listener, shutdown).await?;
                    Ok(())
                });
                Ok(serving)
            })
        },
    )
    .with_admin(admin)
}

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
